"""The KV block pool's bookkeeping (`--kv-cache-memory`): how many fixed-size blocks each request holds.

The paged cache (paged_kv_cache.py) stores KV in a pool of blocks of `block_size` positions and places each
row's blocks itself; this module counts them, without torch, so that the scheduler admits and preempts by the
KV that requests actually hold (as vLLM's block manager does) and the cache never runs out of blocks.
"""

from __future__ import annotations

from genserve.scheduler.core.request import Sequence


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, reserve_fraction: float = 0.0) -> None:
        """`num_blocks` blocks in all; admission leaves `reserve_fraction` of them free for the running requests
        to grow into."""
        if num_blocks < 1:
            raise ValueError("the KV cache holds no block: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserve = int(num_blocks * reserve_fraction)
        self.num_used = 0
        self._held: dict[int, int] = {}  # id(sequence) -> blocks it holds

    @property
    def num_free(self) -> int:
        return self.num_blocks - self.num_used

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def held(self, seq: Sequence) -> int:
        return self._held.get(id(seq), 0)

    def missing(self, seq: Sequence, num_positions: int) -> int:
        """Blocks `seq` still needs to hold `num_positions` positions."""
        return max(0, self.blocks_for(num_positions) - self.held(seq))

    def can_admit(self, num_blocks: int) -> bool:
        """Whether a new request needing `num_blocks` fits and leaves the reserve free."""
        return num_blocks <= self.num_free - self.reserve

    def grow(self, seq: Sequence, num_positions: int) -> bool:
        """Let `seq` hold `num_positions` positions; False (and nothing taken) when too few blocks are free."""
        needed = self.missing(seq, num_positions)
        if needed > self.num_free:
            return False
        if needed:
            self._held[id(seq)] = self.held(seq) + needed
            self.num_used += needed
        return True

    def free(self, seq: Sequence) -> None:
        self.num_used -= self._held.pop(id(seq), 0)
