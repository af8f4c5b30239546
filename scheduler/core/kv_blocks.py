"""The KV block pool (`--kv-cache-memory`): which physical blocks each request holds, which of them it shares, and
which cached prefixes outlive their requests. No torch: the paged cache (paged_cache.py) copies the tables this
pool keeps, and tests drive it alone.

Blocks are numbered 1..num_blocks (the cache's block 0 is scratch). Each holder (a request, or its guidance
companion) has a table of blocks, in position order; a block has a reference count, its number of holders.

Automatic prefix caching (as vLLM V1 and SGLang): a full block of `block_size` tokens is identified by a hash chained
over its parent block's hash and its tokens, rooted in the request's `cache_salt` and LoRA adapter (so different
salts or adapters never share).
A block whose KV is computed is registered under its hash; a later request whose prompt begins with registered
blocks references them (its count goes up) and computes only the rest. A holder writes only into blocks it alone
holds: shared blocks are full, and positions are written past them. A registered block with no holder stays cached,
in least-recently-used order, until the pool needs it: allocation takes an unregistered free block first, then
evicts the least recently used cached one.

Homes: every slot of the batch owns an equal share of the pool laid out like a slot, so that attention can read
rows lying in their homes in place, without gathering. A row takes its home block when it is free, else the
highest unregistered free block (past the homes, then the homes of the highest slots), else the least recently
used cached one. A cached home block is not lost to its row: its KV first moves to the block that would have been
taken instead (a copy the cache makes before the step writes, listed by `take_copies`). A row that moves to
another slot has the blocks it holds alone moved to its new home where it can (`place`).

Locality over sharing while memory is plentiful: a row that shares blocks with another running row cannot lie in its
home, and every step that reads it would gather the rows' blocks (on CPU, a quarter of a decode step at a few
hundred positions). While at least half the pool is free, such a row copies the shared blocks into its free home
blocks once (`settle_home`), and twins copy into the blocks they hold (`share`); past that, rows share, and the
pool holds a shared prefix once.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Sequence_

from genserve.scheduler.core.request import Sequence

BLOCK_SIZE = 16  # positions per block (vLLM's default)


class BlockPool:
    def __init__(
        self,
        num_blocks: int,
        block_size: int = BLOCK_SIZE,
        reserve_fraction: float = 0.0,
        home_blocks: int = 0,
        caching: bool = False,
    ) -> None:
        """`num_blocks` blocks in all; admission leaves `reserve_fraction` of them free for the running requests to
        grow into. `home_blocks`: each slot's share (0: no homes). `caching`: automatic prefix caching."""
        if num_blocks < 1:
            raise ValueError("the KV cache holds no block: give it more memory")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserve = int(num_blocks * reserve_fraction)
        self.home_blocks = home_blocks
        self.caching = caching
        self.num_used = 0  # blocks with at least one holder, each counted once
        self._refs = [0] * (num_blocks + 1)
        self._hash: list[bytes | None] = [None] * (num_blocks + 1)
        self._by_hash: dict[bytes, int] = {}
        # The hashes of registered blocks with no holder, least recently used first (keyed by hash, so that a
        # cached block moved out of a home keeps its place).
        self._cached_free: OrderedDict[bytes, None] = OrderedDict()
        self._plain_free = [-block for block in range(1, num_blocks + 1)]  # max-heap, stale entries skipped
        self._tables: dict[int, list[int]] = {}  # id(holder) -> its blocks, in position order
        self._slots: dict[int, int] = {}  # id(holder) -> its batch slot, once the runner gave it one
        self._copies: list[tuple[int, int]] = []  # cached blocks moved out of homes, for the cache to copy in order
        self.queried_tokens = 0  # prompt tokens looked up at admission
        self.hit_tokens = 0  # of which found cached
        self.evicted_blocks = 0  # cached blocks whose hash was dropped to reuse them

    # Counts.
    @property
    def num_free(self) -> int:
        """Blocks with no holder, cached ones included (the pool takes them back when it needs them)."""
        return self.num_blocks - self.num_used

    @property
    def num_cached_free(self) -> int:
        return len(self._cached_free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def held(self, holder: Sequence) -> int:
        return len(self._tables.get(id(holder), ()))

    def table(self, holder: Sequence) -> list[int]:
        """`holder`'s blocks, in position order (a copy)."""
        return list(self._tables.get(id(holder), ()))

    def references(self, block: int) -> int:
        return self._refs[block]

    def missing(self, holder: Sequence, num_positions: int) -> int:
        """Blocks `holder` still needs to hold `num_positions` positions."""
        return max(0, self.blocks_for(num_positions) - self.held(holder))

    def can_admit(self, num_blocks: int) -> bool:
        """Whether a new request taking `num_blocks` free blocks fits and leaves the reserve free."""
        return num_blocks <= self.num_free - self.reserve

    # Prefix caching.
    def block_hashes(self, holder: Sequence, num_tokens: int) -> list[bytes]:
        """The chained hashes of the full blocks among `holder`'s first `num_tokens` tokens (kept on the holder and
        extended as it grows: a prefix never changes)."""
        hashes = holder.block_hashes
        wanted = num_tokens // self.block_size
        if len(hashes) < wanted:
            tokens = holder.prompt_ids + holder.generated_ids
            parent = hashes[-1] if hashes else _root(holder.options.cache_salt, holder.options.adapter)
            for index in range(len(hashes), wanted):
                block = array("q", tokens[index * self.block_size : (index + 1) * self.block_size]).tobytes()
                parent = hashlib.blake2b(parent + block, digest_size=16).digest()
                hashes.append(parent)
        return hashes[:wanted]

    def cached_prefix(self, holder: Sequence) -> list[int]:
        """The registered blocks `holder`'s tokens begin with, leaving at least its last token to compute (its
        logits are needed); empty without caching."""
        if not self.caching:
            return []
        found = []
        for digest in self.block_hashes(holder, holder.num_tokens - 1):
            block = self._by_hash.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def admission_cost(self, holder: Sequence, hits: list[int]) -> int:
        """Free blocks that admitting `holder` with these cached blocks takes: its missing blocks, and the cached
        ones that have no holder now."""
        return self.blocks_for(holder.num_tokens) - len(hits) + sum(1 for block in hits if not self._refs[block])

    def attach(self, holder: Sequence, hits: list[int]) -> None:
        """`holder` (holding nothing) begins with these cached blocks; counted as a lookup of its tokens."""
        self.queried_tokens += holder.num_tokens
        self.hit_tokens += len(hits) * self.block_size
        table = self._tables.setdefault(id(holder), [])
        assert not table, "attach before anything else"
        for block in hits:
            self._reference(block)
            table.append(block)

    def register(self, holder: Sequence, num_tokens: int) -> None:
        """`holder`'s KV now holds its first `num_tokens` tokens: register its full blocks among them. A block whose
        hash another block already holds stays unregistered (a duplicate, freed as plain)."""
        if not self.caching:
            return
        table = self._tables.get(id(holder), [])
        for index, digest in enumerate(self.block_hashes(holder, min(num_tokens, len(table) * self.block_size))):
            block = table[index]
            if self._hash[block] is None and digest not in self._by_hash:
                self._hash[block] = digest
                self._by_hash[digest] = block

    def share(self, holder: Sequence, twin: Sequence, num_blocks: int) -> list[tuple[int, int]]:
        """`holder` (same tokens as `twin`, computed this step) takes `twin`'s KV for its first `num_blocks` blocks,
        block by block: while half the pool is free, as a copy into the block it holds (its row keeps reading in
        place); else it drops its block for `twin`'s. Returns the (twin's, its own) copies for the cache to make."""
        table, twin_table = self._tables[id(holder)], self._tables[id(twin)]
        copies = []
        for index in range(num_blocks):
            if table[index] == twin_table[index]:
                continue
            if self._roomy(spending=0):
                copies.append((twin_table[index], table[index]))
            else:
                self._dereference(table[index])
                self._reference(twin_table[index])
                table[index] = twin_table[index]
        return copies

    # Allocation.
    def grow(self, holder: Sequence, num_positions: int) -> bool:
        """Let `holder` hold `num_positions` positions; False (and nothing taken) when too few blocks are free."""
        needed = self.missing(holder, num_positions)
        if needed > self.num_free:
            return False
        table = self._tables.setdefault(id(holder), [])
        slot = self._slots.get(id(holder))
        for _ in range(needed):
            block = self._take(self._home(slot, len(table)))
            self._reference(block)
            table.append(block)
        return True

    def free(self, holder: Sequence) -> None:
        """`holder` holds nothing now; blocks left without a holder stay cached when registered."""
        for block in self._tables.pop(id(holder), ()):
            self._dereference(block)
        self._slots.pop(id(holder), None)

    def place(self, moves: Sequence_[tuple[Sequence, int, int]]) -> list[tuple[int, int]]:
        """Holders take batch slots: (holder, slot, positions of its KV written so far). The blocks each holds alone
        move to its new home where the home is free or vacated by another mover, all moves at once (rows may
        swap). Returns the (from, to) block copies that carry written KV; a registered block's hash moves along."""
        entries = []  # (table, index, old block, its hash)
        written_blocks = {}
        for holder, slot, written in moves:
            self._slots[id(holder)] = slot
            table = self._tables.setdefault(id(holder), [])
            written_blocks[id(table)] = self.blocks_for(written)
            entries += [(table, index, block, slot) for index, block in enumerate(table) if self._refs[block] == 1]
        vacated = {block for _, _, block, _ in entries}
        hashes = {block: self._hash[block] for block in vacated}
        for block in vacated:  # the movers' blocks are free for each other now
            self._unregister(block, evicted=False)
        taken: set[int] = set()
        unplaced = []
        for entry in entries:
            table, index, block, slot = entry
            home = self._home(slot, index)
            if home is not None and home not in taken and (home in vacated or not self._refs[home]):
                if home not in vacated:
                    self._take(home)
                    self._reference(home)
                taken.add(home)
                table[index] = home
            else:
                unplaced.append(entry)
        spare = iter(sorted(vacated - taken))
        for table, index, block, _ in unplaced:  # keep the block where it was, else any block a mover vacated
            if block in taken:
                block = next(candidate for candidate in spare if candidate not in taken)
            taken.add(block)
            table[index] = block
        copies = []
        for table, index, block, _ in entries:
            new = table[index]
            digest = hashes[block]
            if digest is not None and digest not in self._by_hash:
                self._hash[new], self._by_hash[digest] = digest, new
            if new != block and index < written_blocks[id(table)]:
                copies.append((block, new))
        for block in vacated - taken:
            self._refs[block] = 0
            self.num_used -= 1
            self._release(block)
        return copies

    def settle_home(self, holder: Sequence) -> list[tuple[int, int]]:
        """While at least half the pool stays free, `holder` trades each block it shares for a copy in its own free
        home block (one copy now, instead of a gather on every step that reads the row). Returns the (shared,
        home) copies, for the cache to make after `take_copies`'s."""
        slot = self._slots.get(id(holder))
        table = self._tables.get(id(holder), [])
        copies = []
        for index, block in enumerate(table):
            home = self._home(slot, index)
            if home is None or home == block or self._refs[block] < 2 or self._refs[home]:
                continue
            if not self._roomy(spending=1):
                break
            self._take(home)
            self._reference(home)
            self._dereference(block)
            table[index] = home
            copies.append((block, home))
        return copies

    def take_copies(self) -> list[tuple[int, int]]:
        """The (from, to) block copies that carry cached KV out of homes since the last call, to make in order
        before the next pass writes."""
        copies, self._copies = self._copies, []
        return copies

    def is_home(self, holder: Sequence) -> bool:
        """Whether every block `holder` holds is its slot's home block."""
        slot = self._slots.get(id(holder))
        return slot is not None and all(
            block == self._home(slot, index) for index, block in enumerate(self._tables.get(id(holder), ()))
        )

    # Internals.
    def _roomy(self, spending: int) -> bool:
        """Whether half the pool stays free after `spending` more blocks: rows then take copies over shares."""
        return self.num_free - spending >= self.num_blocks // 2

    def _home(self, slot: int | None, index: int) -> int | None:
        if slot is None or index >= self.home_blocks:
            return None
        return 1 + slot * self.home_blocks + index

    def _take(self, home: int | None) -> int:
        """A free block, about to be referenced: `home` when free (its cached KV, if any, moved out first), else the
        highest unregistered free block, else the least recently used cached one (evicted)."""
        if home is not None and not self._refs[home]:
            if self._hash[home] is not None:
                self._move_cached(home)
            block = home
        else:
            block = self._spare_block(avoid=None)
        self._claim_free(block)
        return block

    def _spare_block(self, avoid: int | None) -> int | None:
        """The highest unregistered free block, else the least recently used cached one other than `avoid`."""
        while self._plain_free:
            block = -heapq.heappop(self._plain_free)
            if not self._refs[block] and self._hash[block] is None and block != avoid:
                return block
        for digest in self._cached_free:
            if self._by_hash[digest] != avoid:
                return self._by_hash[digest]
        return None

    def _move_cached(self, block: int) -> None:
        """Move a free cached block's KV to a spare block (evicting the least recently used one when nothing else
        is free), keeping its place in the LRU order; when it is the only free block, it is evicted."""
        spare = self._spare_block(avoid=block)
        if spare is None:
            return
        self._claim_free(spare)
        digest = self._hash[block]
        self._hash[block], self._hash[spare], self._by_hash[digest] = None, digest, spare
        self._copies.append((block, spare))

    def _claim_free(self, block: int) -> None:
        """A free block leaves the free lists (its hash dropped); the caller references it."""
        if self._hash[block] is not None:
            self._unregister(block, evicted=True)

    def _unregister(self, block: int, evicted: bool) -> None:
        digest = self._hash[block]
        if digest is None:
            return
        self._hash[block] = None
        del self._by_hash[digest]
        self._cached_free.pop(digest, None)
        self.evicted_blocks += evicted

    def _reference(self, block: int) -> None:
        if not self._refs[block]:
            self.num_used += 1
            if self._hash[block] is not None:
                self._cached_free.pop(self._hash[block], None)
        self._refs[block] += 1

    def _dereference(self, block: int) -> None:
        self._refs[block] -= 1
        if not self._refs[block]:
            self.num_used -= 1
            self._release(block)

    def _release(self, block: int) -> None:
        """A block just left without holders joins its free list."""
        if self._hash[block] is not None:
            self._cached_free[self._hash[block]] = None  # the most recently used end
        else:
            heapq.heappush(self._plain_free, -block)
            if len(self._plain_free) > 2 * self.num_blocks:  # blocks taken as homes leave stale entries
                self._plain_free = [
                    -b for b in range(1, self.num_blocks + 1) if not self._refs[b] and self._hash[b] is None
                ]
                heapq.heapify(self._plain_free)


def _root(cache_salt: str, adapter: str) -> bytes:
    """The parent of a request's first block: its salt and its LoRA adapter, so that requests with different salts
    or adapters (whose keys and values differ for the same tokens) never share."""
    if not cache_salt and not adapter:
        return b""
    return hashlib.blake2b(f"{len(cache_salt)}:{cache_salt}{adapter}".encode(), digest_size=16).digest()
