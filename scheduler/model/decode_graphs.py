"""Static-shape decode passes, replayed from CUDA graphs on a GPU (the gpt-fast / vLLM way to remove per-step
launch overhead, which dominates a small model's decode step).

A plain decode step (one query per row) is padded to a batch-size bucket (1, 2, 4, 8, ...) and reads the KV
cache up to a length bucket (64, 128, ... the cache's capacity), so each (batch, length) bucket has fixed
shapes and fixed addresses: inputs are copied into static buffers and the captured graph is replayed. Padding
rows sit in free slots (running rows are always slots 0..B-1) and write at position 0, which a row prefilled
into that slot later overwrites. The cache is allocated at full size up front, so its tensors never move.

Capture happens the first time a bucket is needed. While capturing, every position points at the cache's last
spare position, which no row's KV ever occupies, so capturing next to live rows harms nothing. If capture
fails (an operation in the model that cannot be captured), the same static pass runs eagerly from then on.
On CPU (tests) the static pass always runs eagerly: the same code, without capture.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from genserve.scheduler.kv.slot_cache import SlotKVCache, decode_pass
from genserve.scheduler.model.lora_layers import AdapterRows, adapter_rows
from genserve.scheduler.model.lora_slots import LoraSlots

log = logging.getLogger(__name__)
MIN_LENGTH_BUCKET = 64


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: capture failed or not on CUDA; run eagerly
    tokens: torch.Tensor  # [batch bucket, 1]
    positions: torch.Tensor  # [batch bucket, 1]
    read_length: int  # the length bucket
    adapters: AdapterRows | None = None  # serving LoRA: each row's adapter slot, a static buffer (padding: 0)
    logits: torch.Tensor | None = None  # the graph's output


class StaticDecoder:
    def __init__(self, model: torch.nn.Module, cache: SlotKVCache, capture: bool, lora: LoraSlots | None) -> None:
        """`lora`: the adapter slots when serving LoRA adapters (every pass then computes rows' adapters)."""
        self.model = model
        self.lora = lora
        self.cache = cache
        self.device = cache.device
        self.capture = capture and self.device.type == "cuda"
        cache.ensure_capacity(cache.max_positions)  # full size up front: the tensors graphs point at never move
        self.batch_buckets = _powers_of_two(1, cache.max_rows)
        self.length_buckets = _powers_of_two(MIN_LENGTH_BUCKET, cache.capacity)
        self._buckets: dict[tuple[int, int], _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None

    @property
    def captured_graphs(self) -> int:
        """Buckets replayed from a CUDA graph (0 on CPU, or after a capture failed and decoding went eager)."""
        return sum(bucket.graph is not None for bucket in self._buckets.values())

    def logits(
        self, tokens: torch.Tensor, positions: torch.Tensor, read_length: int, adapters: list[str] | None = None
    ) -> torch.Tensor:
        """Next-token logits [rows, vocab] after each row's token at its position (one query per row), each row
        with its LoRA adapter (`adapters`, when serving them)."""
        num_rows = tokens.shape[0]
        batch = next(size for size in self.batch_buckets if size >= num_rows)
        length = next(size for size in self.length_buckets if size >= read_length)
        bucket = self._buckets.get((batch, length)) or self._prepare(batch, length)
        bucket.tokens.zero_()
        bucket.positions.zero_()  # padding rows: token 0 at position 0 of a free slot
        bucket.tokens[:num_rows] = tokens
        bucket.positions[:num_rows] = positions
        if bucket.adapters is not None:
            self.lora.write_rows(bucket.adapters, adapters)
        if bucket.graph is None:
            return self._forward(bucket)[:num_rows]
        bucket.graph.replay()
        return bucket.logits[:num_rows]

    def _forward(self, bucket: _Captured) -> torch.Tensor:
        with adapter_rows(bucket.adapters):
            return decode_pass(self.model, self.cache, bucket.tokens, bucket.positions, bucket.read_length)[:, -1]

    def _prepare(self, batch: int, length: int) -> _Captured:
        bucket = _Captured(
            graph=None,
            tokens=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            positions=torch.zeros(batch, 1, dtype=torch.long, device=self.device),
            read_length=length,
        )
        if self.lora is not None:  # every row selects its slot: a captured pass cannot choose by its rows' adapters
            bucket.adapters = self.lora.static_rows(batch)
        if self.capture:
            self._capture(bucket)
        self._buckets[(batch, length)] = bucket
        return bucket

    def _capture(self, bucket: _Captured) -> None:
        spare = self.cache.capacity - 1  # no row's KV lives there: writes while capturing harm nothing
        bucket.positions.fill_(spare)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisations must not happen inside the capture
                    self._forward(bucket)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                bucket.logits = self._forward(bucket)
            bucket.graph = graph
        except Exception as error:  # noqa: BLE001 - a model op that cannot be captured: decode eagerly instead
            log.warning("CUDA graph capture failed (%s); decoding without CUDA graphs", error)
            self.capture = False
            bucket.graph = bucket.logits = None


def _powers_of_two(smallest: int, largest: int) -> list[int]:
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]
