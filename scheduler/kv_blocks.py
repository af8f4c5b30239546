"""The KV block pool's bookkeeping (`--kv-cache-memory`): which fixed-size blocks each request holds.

The paged cache (paged_kv_cache.py) stores KV in a pool of blocks of `block_size` positions; this module decides
which block holds what, without torch, so that the scheduler admits and preempts by the KV that requests actually
hold (as vLLM's block manager). Block 0 is the cache's scratch block, never handed out: table entries past a
request's blocks point there, so the padding positions of a batched prefill write somewhere harmless.
"""

from __future__ import annotations

from scheduler.request import Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, reserve_fraction: float = 0.0) -> None:
        """`num_blocks` usable blocks (ids 1..num_blocks); admission leaves `reserve_fraction` of them free for
        the running requests to grow into."""
        if num_blocks < 1:
            raise ValueError("the KV cache holds no block: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserve = int(num_blocks * reserve_fraction)
        self._free = list(range(num_blocks, 0, -1))  # popped from the end: low ids first
        self._tables: dict[int, list[int]] = {}  # id(sequence) -> its blocks, in position order

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def table(self, seq: Sequence) -> tuple[int, ...]:
        return tuple(self._tables.get(id(seq), ()))

    def missing(self, seq: Sequence, num_positions: int) -> int:
        """Blocks `seq` still needs to hold `num_positions` positions."""
        return max(0, self.blocks_for(num_positions) - len(self._tables.get(id(seq), ())))

    def can_admit(self, num_blocks: int) -> bool:
        """Whether a new request needing `num_blocks` fits and leaves the reserve free."""
        return num_blocks <= self.num_free - self.reserve

    def grow(self, seq: Sequence, num_positions: int) -> bool:
        """Give `seq` blocks for `num_positions` positions; False (and nothing taken) when too few are free."""
        needed = self.missing(seq, num_positions)
        if needed > len(self._free):
            return False
        if needed:
            table = self._tables.setdefault(id(seq), [])
            table.extend(self._free.pop() for _ in range(needed))
        return True

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(self._tables.pop(id(seq), ())))
