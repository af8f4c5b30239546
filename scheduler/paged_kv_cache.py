"""A paged KV cache (`--kv-cache-memory`): KV lives in a fixed pool of blocks of `block_size` positions, and each
row reads its positions through a block table, so memory is held by the tokens requests have, not by rows times
the longest context (vLLM's PagedAttention, transformers' PagedAttentionCache).

The scheduler decides which blocks a request holds (kv_blocks.py) and the plan carries its table; this cache
only stores and reads. Rows still occupy slots 0..B-1 as in the slot cache, so moving a row moves its table row,
not its KV. Block 0 is scratch: the table entries a row does not hold point there, so the padding positions of a
right-padded prefill land harmlessly, and reads past a row's length (masked) find finite values. The pool and
the table are allocated once, at start-up, and never move (what CUDA graphs need).

Attention reads a row's positions gathered block by block into the same [rows, heads, length, head_dim] layout
the slot cache hands it, so the attention kernels, masks and sums are the same as with slots. The gather is a
copy of what a step reads: on CPU, where a step is bound by memory traffic, it costs time (README: "KV memory").
"""

from __future__ import annotations

import torch

from scheduler.attention_masks import AttentionLayout
from scheduler.kv_cache import SlotKVCache

BLOCK_SIZE = 16  # positions per block (vLLM's default)


class PagedKVCache(SlotKVCache):
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
        self.max_blocks_per_row = -(-self.max_positions // block_size)
        self.block_table = torch.zeros(max_rows, self.max_blocks_per_row, dtype=torch.long, device=device)
        for layer, shapes in enumerate(layer_shapes):
            for pools, (heads, head_dim) in zip((self.keys, self.values), shapes):
                pools[layer] = torch.zeros(num_blocks + 1, block_size, heads, head_dim, dtype=dtype, device=device)
        self._writes: torch.Tensor | None = None  # this pass's write positions in the flattened pool
        self._reads: torch.Tensor | None = None  # the blocks this pass reads, [rows, blocks]

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
        return cls(probe.layout, max_rows, max_context, probe.dtype, probe.device, shapes, num_blocks, spare_positions)

    HEADS_AXIS = 2  # of each layer's pool, [blocks, block_size, heads, head_dim]

    def ensure_capacity(self, num_positions: int) -> None:
        """Nothing to grow: the pool is allocated whole at start-up."""

    def set_blocks(self, row: int, blocks: tuple[int, ...]) -> None:
        """Point `row` at these blocks (the rest of its table at scratch)."""
        table = torch.zeros(self.max_blocks_per_row, dtype=torch.long)
        table[: len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        self.block_table[row] = table.to(self.device)

    def clear_rows(self, first_row: int) -> None:
        """Rows from `first_row` on hold nothing now: their tables point at scratch."""
        self.block_table[first_row:] = 0

    def move_rows(self, sources: list[int], destinations: list[int]) -> None:
        if sources:
            table = self.block_table
            table[torch.tensor(destinations, device=self.device)] = table[torch.tensor(sources, device=self.device)]

    def _pool_positions(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where `positions` ([rows, n]) of `rows` ([rows, 1]) live in a pool flattened to [blocks * size, ...]."""
        blocks = self.block_table[rows, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks * self.block_size + positions % self.block_size

    def begin_prefill(self, first_row: int, num_rows: int, num_queries: int, offset: int = 0) -> None:
        super().begin_prefill(first_row, num_rows, num_queries, offset)
        rows = torch.arange(first_row, first_row + num_rows, device=self.device).unsqueeze(1)
        positions = torch.arange(offset, offset + num_queries, device=self.device).expand(num_rows, num_queries)
        self._writes = self._pool_positions(rows, positions).flatten()
        read_blocks = -(-(offset + num_queries) // self.block_size)
        self._reads = self.block_table[first_row : first_row + num_rows, :read_blocks] if offset else None

    def begin_decode(self, positions: torch.Tensor, read_length: int) -> None:
        super().begin_decode(positions, read_length)
        rows = torch.arange(positions.shape[0], device=self.device).unsqueeze(1)
        self._writes = self._pool_positions(rows, positions).flatten()
        self._reads = self.block_table[: positions.shape[0], : -(-read_length // self.block_size)]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this pass's keys/values into their blocks; return what attention reads: the new ones alone for
        new rows, else every position each row reads, gathered from its blocks."""
        current = self._current()
        read = []
        for pool, states in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            rows, heads, queries, head_dim = states.shape
            pool.view(-1, heads, head_dim).index_copy_(
                0, self._writes, states.transpose(1, 2).reshape(-1, heads, head_dim)
            )
            if self._reads is not None:
                length = current.offset + queries if current.is_prefill else current.read_length
                gathered = pool.index_select(0, self._reads.flatten()).view(rows, -1, heads, head_dim)
                read.append(gathered[:, :length].transpose(1, 2))
        return (read[0], read[1]) if read else (key_states, value_states)

    def _row_positions(self, row: int, start: int, end: int) -> torch.Tensor:
        rows = torch.tensor([[row]], device=self.device)
        return self._pool_positions(rows, torch.arange(start, end, device=self.device).unsqueeze(0)).flatten()

    def read_row(self, layer: int, row: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        where = self._row_positions(row, 0, length)
        return tuple(pool.flatten(0, 1)[where].transpose(0, 1) for pool in (self.keys[layer], self.values[layer]))

    def write_row(self, layer: int, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        where = self._row_positions(row, start, start + keys.shape[1])
        for pool, states in ((self.keys[layer], keys), (self.values[layer], values)):
            pool.flatten(0, 1).index_copy_(0, where, states.transpose(0, 1))

    def reset(self) -> None:
        super().reset()
        self.block_table.zero_()
