"""A paged KV cache (`--kv-cache-memory`): KV lives in a fixed pool of blocks of `block_size` positions, and each
row reads its positions through a block table, so memory is held by the tokens requests have, not by rows times
the longest context (vLLM's PagedAttention, transformers' PagedAttentionCache).

Which physical blocks a row holds, shares with other rows (a cached prefix) or moves, is the block pool's decision
(core/kv_blocks.py); this cache keeps the tables the runner copies from it, and the tensors. Every slot has a
home, an equal share of the pool laid out like a slot: while every row of a pass lies in its own home, attention
reads the homes as one strided view, with no copy, as fast as the slot cache; otherwise (a shared prefix, a
borrowed block) the rows' blocks are gathered into that layout (a copy of what the step reads).

Block 0 is scratch: the table entries a row does not hold point there, so the padding positions of a
right-padded prefill land harmlessly, and reads past a row's length (masked) find finite values. The pool and
the table are allocated once, at start-up, and never move (what CUDA graphs need; captured passes always
gather, since a graph cannot choose).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from genserve.scheduler.core.kv_blocks import BLOCK_SIZE
from genserve.scheduler.kv.attention_masks import AttentionLayout
from genserve.scheduler.kv.slot_cache import PassPlan, SlotKVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracedDecode:
    """A compiled decode pass whose rows all read their homes in place, so that the traced graph writes and reads
    the pool itself (compiled_step.py): `writes` as PassPlan's, and the pass's mask, whose last axis is how many
    positions each row reads."""

    writes: torch.Tensor
    mask: torch.Tensor


class PagedKVCache(SlotKVCache):
    HEADS_AXIS = 0  # of each layer's pool, [heads, blocks, block_size, head_dim]

    def __init__(
        self,
        layout: AttentionLayout,
        max_rows: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device,
        layer_shapes: list[tuple[tuple[int, int], tuple[int, int]]],
        num_blocks: int,
        spare_positions: int = 0,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        """`layer_shapes`: each layer's (heads, head_dim) of keys and of values; `num_blocks` usable blocks."""
        super().__init__(layout, max_rows, max_context, dtype, device, spare_positions=spare_positions)
        self.capacity = self.max_positions  # every position is addressable from the start: nothing ever grows
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.home_blocks = num_blocks // max_rows  # each slot's share; what is left over is lent first
        self.max_blocks_per_row = -(-self.max_positions // block_size)
        self.block_table = torch.zeros(max_rows, self.max_blocks_per_row, dtype=torch.long, device=device)
        for layer, shapes in enumerate(layer_shapes):
            for pools, (heads, head_dim) in zip((self.keys, self.values), shapes):
                pools[layer] = torch.zeros(heads, num_blocks + 1, block_size, head_dim, dtype=dtype, device=device)
        self.always_gather = False  # set for captured (CUDA graph) passes, which cannot choose their reads
        self._away: set[int] = set()  # slots holding a block outside their home
        self._gathered: list[torch.Tensor | None] = [None, None]  # see _gather_buffer
        self.traced_decode: TracedDecode | None = None  # set for the compiled decode passes that read in place

    @classmethod
    def for_model(  # type: ignore[override]
        cls, model: torch.nn.Module, max_rows: int, max_context: int, spare_positions: int, memory_bytes: int
    ) -> PagedKVCache:
        """A pool of `memory_bytes` for this model. A one-row slot cache probes the model first: it refuses what
        the engine cannot serve, and learns each layer's key and value shapes."""
        probe = SlotKVCache.for_model(model, 1, 1, 0)
        num_blocks = memory_bytes // (probe.bytes_per_token * BLOCK_SIZE) - 1  # one is the scratch block
        if num_blocks < 1:
            raise ValueError(f"--kv-cache-memory {memory_bytes} bytes holds no block of {BLOCK_SIZE} positions")
        shapes = [probe.layer_shapes(layer) for layer in range(probe.num_layers)]
        log.info(
            "paged KV cache: %d blocks of %d positions (%d tokens) in %.2f GiB",
            num_blocks,
            BLOCK_SIZE,
            num_blocks * BLOCK_SIZE,
            memory_bytes / 2**30,
        )
        return cls(probe.layout, max_rows, max_context, probe.dtype, probe.device, shapes, num_blocks, spare_positions)

    def ensure_capacity(self, num_positions: int) -> None:
        """Nothing to grow: the pool is allocated whole at start-up."""

    # Tables, as the block pool placed the rows.
    def set_row(self, row: int, blocks: list[int], at_home: bool) -> None:
        """`row` reads and writes these physical blocks, in position order (the rest of its table: scratch)."""
        table = torch.zeros(self.max_blocks_per_row, dtype=torch.long)
        table[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.block_table[row] = table.to(self.device)
        if at_home:
            self._away.discard(row)
        else:
            self._away.add(row)

    def free_rows(self, rows: set[int]) -> None:
        """These rows hold nothing now: their tables point at scratch."""
        for row in rows:
            self._away.discard(row)
            self.block_table[row] = 0

    def copy_blocks_in_order(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's KV as if one after the other (a block copied on may be a later
        source): runs of independent copies go together."""
        run: list[tuple[int, int]] = []
        for source, destination in pairs:
            if any(source == written or destination == written for _, written in run):
                self.copy_blocks(run)
                run = []
            run.append((source, destination))
        self.copy_blocks(run)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy each (source, destination) block's KV, in every layer, all at once (so that blocks may swap)."""
        if not pairs:
            return
        sources = torch.tensor([source for source, _ in pairs], device=self.device)
        destinations = torch.tensor([destination for _, destination in pairs], device=self.device)
        for pool in (*self.keys, *self.values):
            pool[:, destinations] = pool[:, sources]  # the right side is read whole first

    # Passes.
    def _pool_positions(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where `positions` ([rows, n]) of `rows` ([rows, 1]) live in a pool flattened to [heads, blocks * size,
        head_dim]."""
        blocks = self.block_table[rows, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks * self.block_size + positions % self.block_size

    def _plan_reads(self, part: PassPlan, length: int) -> None:
        """Read the pass's rows in place when they all lie in their homes, else gather their blocks."""
        first_row, num_rows = part.first_row, part.num_rows
        at_home = not self.always_gather and not any(first_row <= row < first_row + num_rows for row in self._away)
        if at_home and length <= self.home_blocks * self.block_size:
            part.view_rows = slice(first_row, first_row + num_rows)
        else:
            read_blocks = -(-length // self.block_size)
            part.reads = self.block_table[first_row : first_row + num_rows, :read_blocks]

    def _plan_writes(self, part: PassPlan, positions: torch.Tensor) -> None:
        rows = torch.arange(part.first_row, part.first_row + part.num_rows, device=self.device).unsqueeze(1)
        part.writes = self._pool_positions(rows, positions).flatten()

    def begin_prefill(self, first_row: int, num_rows: int, num_queries: int, offset: int = 0) -> None:
        super().begin_prefill(first_row, num_rows, num_queries, offset)
        positions = torch.arange(offset, offset + num_queries, device=self.device).expand(num_rows, num_queries)
        self._plan_writes(self._pass, positions)
        if offset:  # new rows (no offset) read only what the pass just computed
            self._plan_reads(self._pass, offset + num_queries)

    def plan_decode(self, positions: torch.Tensor, read_length: int, first_row: int = 0) -> PassPlan:
        part = super().plan_decode(positions, read_length, first_row)
        self._plan_writes(part, positions)
        self._plan_reads(part, read_length)
        return part

    def write_and_read(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, part: PassPlan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's (or this planned `part`'s) keys/values into their blocks; return what attention
        reads: the new ones alone for new rows, else every position each row reads, [rows, heads, length,
        head_dim]."""
        current = part or self._current()
        read = []
        for side, (pool, states) in enumerate(
            ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states))
        ):
            rows, heads, queries, head_dim = states.shape
            flat = pool.view(heads, -1, head_dim)
            flat.index_copy_(1, current.writes, states.transpose(0, 1).reshape(heads, -1, head_dim))
            length = current.offset + queries if current.is_prefill else current.read_length
            if current.view_rows is not None:
                read.append(self._homes(pool)[:, current.view_rows, :length].transpose(0, 1))
            elif current.reads is not None:
                blocks = current.reads.flatten()
                gathered = self._gather_buffer(side, (heads, blocks.numel(), *pool.shape[2:]), pool.dtype)
                torch.index_select(pool, 1, blocks, out=gathered)
                gathered = gathered.view(heads, rows, -1, head_dim)
                read.append(gathered[:, :, :length].transpose(0, 1))
        return (read[0], read[1]) if read else (key_states, value_states)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.traced_decode is not None:
            return self._write_and_read_homes(key_states, value_states, layer_idx, self.traced_decode)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _write_and_read_homes(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, decode: TracedDecode
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What write_and_read() does for a decode pass of one query per row ([1, heads, rows, head_dim], flat),
        every row read at home, in torch ops that a traced graph takes in: shapes from the tensors rather than
        the plan's ints, so that one graph serves every row count and length (inductor fuses the write into the
        kernel that computes the keys, and the reads are views of the pool, as in the eager pass)."""
        rows, length = key_states.shape[2], decode.mask.shape[-1]
        read = []
        for pool, states in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            heads, head_dim = pool.shape[0], pool.shape[-1]
            pool.view(heads, -1, head_dim).index_copy_(1, decode.writes, states[0])
            read.append(self._homes(pool)[:, :rows, :length].transpose(0, 1))
        return read[0], read[1]

    def _homes(self, pool: torch.Tensor) -> torch.Tensor:
        """A layer's pool as the slots' homes, [heads, slots, home positions, head_dim] (a view)."""
        heads, head_dim = pool.shape[0], pool.shape[-1]
        return pool[:, 1 : 1 + self.max_rows * self.home_blocks].view(heads, self.max_rows, -1, head_dim)

    def _gather_buffer(self, side: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where a layer's keys (side 0) or values (1) are gathered: one buffer per side, reused by every layer
        (each layer's attention is done with it before the next gathers), so that a step does not allocate and
        fault in fresh memory per layer."""
        numel = math.prod(shape)
        buffer = self._gathered[side]
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._gathered[side] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel].view(shape)

    def _row_positions(self, row: int, start: int, end: int) -> torch.Tensor:
        rows = torch.tensor([[row]], device=self.device)
        return self._pool_positions(rows, torch.arange(start, end, device=self.device).unsqueeze(0)).flatten()

    def read_row(self, layer: int, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = self._row_positions(row, 0, length)
        return tuple(pool.flatten(1, 2)[:, where] for pool in (self.keys[layer], self.values[layer]))

    def write_row(self, layer: int, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        where = self._row_positions(row, start, start + keys.shape[1])
        for pool, states in ((self.keys[layer], keys), (self.values[layer], values)):
            pool.flatten(1, 2).index_copy_(1, where, states)

    def reset(self) -> None:
        super().reset()
        self.free_rows(set(range(self.max_rows)))


def pool_bytes(setting: float, device: torch.device) -> int:
    """--kv-cache-memory in bytes: a size, or (<= 1) that fraction of the memory the device has free."""
    if setting > 1:
        return int(setting)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * setting)
