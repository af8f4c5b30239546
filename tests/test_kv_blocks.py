"""The KV block pool alone: a hypothesis state machine drives admissions with cached prefixes, growth, twins sharing
blocks, slot moves, finishes, preemptions and evictions, and checks the pool's books and the KV it would serve
after every operation."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from genserve.scheduler.core.kv_blocks import BlockPool
from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import RequestOptions, Sequence

BLOCK = 4  # small blocks, so that short prompts span several
NUM_BLOCKS = 24
MAX_ROWS = 4
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]  # overlapping, so that hits happen


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BLOCK, home_blocks=NUM_BLOCKS // MAX_ROWS, caching=True)
        self.holders: list[Sequence] = []
        self.computed: dict[int, int] = {}  # id(holder) -> full blocks whose KV it has written (or found cached)
        self.content: dict[int, bytes] = {}  # block -> the chained hash of the KV written there (the "tensor")
        self.slots: dict[int, int] = {}  # id(holder) -> slot
        self.count = 0

    # Operations.
    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(10, 12), max_size=6), salt=st.sampled_from("ab"))
    def admit(self, prefix: list[int], tail: list[int], salt: str) -> None:
        self.count += 1
        seq = Sequence(f"r{self.count}", prefix + tail, GenerationParameters(), options=RequestOptions(cache_salt=salt))
        hits = self.pool.cached_prefix(seq)
        if self.pool.admission_cost(seq, hits) > self.pool.num_free:
            return
        free_before = self.pool.num_free
        self.pool.attach(seq, hits)
        assert self.pool.grow(seq, seq.num_tokens)
        assert free_before - self.pool.num_free == self.pool.admission_cost(seq, []) - len(hits) + sum(
            1 for block in hits if self.pool.references(block) == 1
        )
        self._apply(self.pool.take_copies())
        hashes = self.pool.block_hashes(seq, seq.num_tokens)
        for index, block in enumerate(hits):  # a hit serves exactly the KV of these tokens
            assert self.content[block] == hashes[index]
        self.computed[id(seq)] = len(hits)
        self.holders.append(seq)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """The holder's forward writes its remaining full blocks, which must be its own, and registers them."""
        seq = data.draw(st.sampled_from(self.holders))
        table = self.pool.table(seq)
        hashes = self.pool.block_hashes(seq, seq.num_tokens)
        for index in range(self.computed[id(seq)], len(hashes)):
            assert self.pool.references(table[index]) == 1, "a shared block is never written"
            self.content[table[index]] = hashes[index]
        self.computed[id(seq)] = len(hashes)
        self.pool.register(seq, seq.num_tokens)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), count=st.integers(1, 6))
    def extend(self, data: st.DataObject, count: int) -> None:
        """Decoding: new tokens; where no block is free, the holder is preempted (its blocks stay cached)."""
        seq = data.draw(st.sampled_from(self.holders))
        if self.computed[id(seq)] < len(self.pool.block_hashes(seq, seq.num_tokens)):
            return  # not prefilled yet
        seq.generated_ids.extend([11] * count)
        if self.pool.grow(seq, seq.num_tokens):
            self._apply(self.pool.take_copies())
        else:
            self._leave(seq, keep_cached=False)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def twin(self, data: st.DataObject) -> None:
        """A request with an existing computed holder's tokens takes its blocks (n samples)."""
        original = data.draw(st.sampled_from(self.holders))
        full = len(self.pool.block_hashes(original, original.num_tokens))
        if self.computed[id(original)] < full:
            return
        self.count += 1
        seq = Sequence(f"t{self.count}", list(original.prompt_ids + original.generated_ids), GenerationParameters())
        seq = Sequence(seq.request_id, seq.prompt_ids, seq.params, options=original.options)
        if self.pool.blocks_for(seq.num_tokens) > self.pool.num_free:
            return
        self.pool.attach(seq, [])
        assert self.pool.grow(seq, seq.num_tokens)
        self._apply(self.pool.take_copies())
        free_before = self.pool.num_free
        copies = self.pool.share(seq, original, full)
        self._apply(copies)
        shared = sum(1 for pair in zip(self.pool.table(seq)[:full], self.pool.table(original)) if len(set(pair)) == 1)
        assert len(copies) + shared == full and self.pool.num_free - free_before == shared
        assert all(self.pool.references(block) == 1 for _, block in copies)
        self.computed[id(seq)] = full
        self.holders.append(seq)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def move(self, data: st.DataObject) -> None:
        """Some holders take slots at once (rows joining the batch, swapping, filling holes)."""
        movers = data.draw(st.lists(st.sampled_from(self.holders), unique_by=id, min_size=1, max_size=MAX_ROWS))
        taken = {slot for key, slot in self.slots.items() if key not in {id(seq) for seq in movers}}
        free_slots = [slot for slot in range(MAX_ROWS) if slot not in taken]
        if len(free_slots) < len(movers):
            return
        slots = data.draw(st.permutations(free_slots))[: len(movers)]
        moves = [(seq, slot, self.pool.held(seq) * BLOCK) for seq, slot in zip(movers, slots)]
        copies = self.pool.place(moves)
        self._apply(self.pool.take_copies())
        snapshot = dict(self.content)
        for source, destination in copies:  # all at once
            if source in snapshot:
                self.content[destination] = snapshot[source]
        for seq, slot, _ in moves:
            self.slots[id(seq)] = slot

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """A row in a slot trades its shared blocks for copies in its home, while half the pool stays free."""
        seq = data.draw(st.sampled_from([seq for seq in self.holders if id(seq) in self.slots]))
        free_before, shared_before = self.pool.num_free, self._shared(seq)
        copies = self.pool.settle_home(seq)
        self._apply(self.pool.take_copies())
        self._apply(copies)
        home = self.pool.home_blocks * self.slots[id(seq)] + 1
        assert all(destination - home in range(self.pool.home_blocks) for _, destination in copies)
        assert free_before - self.pool.num_free == len(copies) == shared_before - self._shared(seq)
        if free_before - shared_before >= NUM_BLOCKS // 2:  # room for every copy
            for index, block in enumerate(self.pool.table(seq)[: self.pool.home_blocks]):
                if self.pool.references(block) > 1:  # still shared: its home block is held
                    assert self.pool.references(home + index) > 0

    def _shared(self, seq: Sequence) -> int:
        return sum(1 for block in self.pool.table(seq) if self.pool.references(block) > 1)

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), keep_cached=st.booleans())
    def leave(self, data: st.DataObject, keep_cached: bool) -> None:
        """A finish (what it computed stays cached) or a failure (nothing registered)."""
        self._leave(data.draw(st.sampled_from(self.holders)), keep_cached)

    def _leave(self, seq: Sequence, keep_cached: bool) -> None:
        if keep_cached:
            self.pool.register(seq, self.computed[id(seq)] * BLOCK)
        self.pool.free(seq)
        self.holders = [holder for holder in self.holders if holder is not seq]
        self.slots.pop(id(seq), None)

    def _apply(self, copies: list[tuple[int, int]]) -> None:
        for source, destination in copies:  # in order
            if source in self.content:
                self.content[destination] = self.content[source]

    # What must hold after every operation.
    @invariant()
    def books_balance(self) -> None:
        pool = self.pool
        holders = {}
        for seq in self.holders:
            table = pool.table(seq)
            assert len(set(table)) == len(table)
            for block in table:
                holders[block] = holders.get(block, 0) + 1
        for block in range(1, NUM_BLOCKS + 1):
            assert pool.references(block) == holders.get(block, 0), "a count equals its holders"
        assert pool.num_used == len(holders) and pool.num_used + pool.num_free == NUM_BLOCKS
        assert pool.num_cached_free <= pool.num_free
        for digest in pool._cached_free:  # a cached free block is not referenced
            assert pool.references(pool._by_hash[digest]) == 0

    @invariant()
    def every_hash_serves_its_kv(self) -> None:
        """A registered block (referenced or cached) holds the KV of its hash: nothing referenced was evicted or
        overwritten, and moved blocks carried their KV."""
        for digest, block in self.pool._by_hash.items():
            assert self.content.get(block) == digest
        for seq in self.holders:
            hashes = self.pool.block_hashes(seq, seq.num_tokens)
            table = self.pool.table(seq)
            for index in range(self.computed[id(seq)]):
                assert self.content.get(table[index]) == hashes[index], "a holder's written KV stays its own"


BlockPoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_pool_state_machine = BlockPoolMachine.TestCase
