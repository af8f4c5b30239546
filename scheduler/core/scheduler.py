"""The scheduler decides, the runner computes.

The scheduler owns every request from submit to finish: the waiting queue, the requests prefilling their prompt
chunk by chunk, and the running (decoding) ones. Each step, `schedule()` applies cancels and expiry, preempts
batch rows for waiting interactive requests, and shares the step's token budget (`max_num_batched_tokens`): one
token per decoding row, the rest to prompts. A prompt that fits in what the decoding rows leave of the budget is
prefilled whole (bit-exact with `generate()`); a longer one is split into chunks across steps, so the running rows
keep streaming, and while requests wait it takes at most half of the prompt tokens, so that short prompts are
not held back for its whole prefill. The plan it returns is data (step_plan.py); `update()` applies the
runner's output and makes every finish decision.
Rows of at most `max_loras` distinct LoRA adapters share a step: a request whose adapter would exceed that
waits at the head of the queue until the rows of one adapter are done.
With a paged KV cache (`--kv-cache-memory`) a request is also admitted only when the blocks of its prompt fit
and leave the admission reserve free; when the running rows need blocks that are not free, the least important
(priority, then newest) requests are preempted: back to the queue, tokens kept, recomputed when readmitted.
After an out-of-memory the row limit drops to what fitted and regrows one row per STEPS_TO_REGROW_ONE_ROW
clean steps. No torch here: tests/test_scheduler.py drives it with made-up outputs.
"""

from __future__ import annotations

import logging
import threading

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.kv_blocks import BlockPool
from genserve.scheduler.core.params import MAX_SPECULATIVE
from genserve.scheduler.core.request import FinishReason, Priority, Sequence, TokenEvent
from genserve.scheduler.core.step_plan import ModelOutput, PrefillChunk, StepPlan, StopCode
from genserve.scheduler.core.waiting_queue import WaitingQueue

log = logging.getLogger(__name__)

STEPS_TO_REGROW_ONE_ROW = 200
IDLE_PREFILL_FACTOR = 8  # how many budgets of whole prompts a step may prefill when no row is decoding
_STOP_REASONS = {
    StopCode.EOS_TOKEN: FinishReason.EOS_TOKEN,
    StopCode.LENGTH: FinishReason.LENGTH,
    StopCode.STOPPING_CRITERIA: FinishReason.STOPPING_CRITERIA,
    StopCode.CONSTRAINT_COMPLETE: FinishReason.CONSTRAINT_COMPLETE,
}


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockPool | None = None) -> None:
        """`blocks`: the paged KV cache's pool, whose blocks this scheduler hands out (None: slot cache)."""
        self.config = config
        self.blocks = blocks
        self._grown: dict[int, Sequence] = {}  # requests (or companions) whose blocks grew since the last plan
        self.waiting = WaitingQueue(config.max_queue)
        self.prefilling: list[Sequence] = []  # admitted, prompt not yet fully computed; in admission order
        self.running: list[Sequence] = []  # decoding
        self.row_limit = config.max_running  # lowered after an out-of-memory, regrown slowly
        self._clean_steps = 0
        self._cancels: list[tuple[str, FinishReason]] = []
        self._cancel_lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        """Batch rows held, guidance companions included: what the row limit bounds."""
        return sum(seq.num_slots for seq in (*self.prefilling, *self.running))

    @property
    def free_rows(self) -> int:
        return max(0, self.row_limit - self.num_slots)  # as EngineSnapshot.free_rows reports it after the step

    def add(self, seq: Sequence) -> None:
        self.waiting.add(seq)

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """From any thread; applied at the next schedule()."""
        with self._cancel_lock:
            self._cancels.append((request_id, reason))

    def schedule(self, now: float) -> tuple[StepPlan, list[TokenEvent]]:
        """The next step's plan, and the events of requests that ended before it (cancelled, expired)."""
        released, events = self._apply_cancels()
        for seq in self.waiting.remove_expired(now):
            seq.finish(FinishReason.TIME_LIMIT)
            events.append(TokenEvent(seq.request_id, (), FinishReason.TIME_LIMIT, seq.num_prompt_tokens))
        preempted = self._preempt_for_interactive()
        speculate = sum(seq.num_slots for seq in self.running) <= self.config.speculation_max_rows
        preempted_for_kv = self._secure_decode_blocks(MAX_SPECULATIVE if speculate else 0)
        num_decoding = sum(seq.num_slots for seq in self.running)
        prefills = tuple(self._plan_prefills(num_decoding, now))
        grown, self._grown = self._grown, {}
        plan = StepPlan(
            released=(*released, *preempted, *preempted_for_kv),
            preempted=(*preempted, *preempted_for_kv),
            num_preempted_for_kv=len(preempted_for_kv),
            prefills=prefills,
            decodes=tuple(self.running),
            speculate=speculate,
            kv_blocks=tuple((member, self.blocks.held(member)) for member in grown.values()),
        )
        return plan, events

    def _secure_decode_blocks(self, extra_positions: int) -> list[Sequence]:
        """Give every decoding row the blocks this step writes (its newest token, and `extra_positions` more
        when it may speculate). Where too few are free, the least important request (lowest priority, then
        newest) goes back to the queue, the row itself included when it is that one."""
        if self.blocks is None:
            return []
        preempted: list[Sequence] = []
        for seq in sorted(self.running, key=_importance):
            if seq.is_finished or any(seq is victim for victim in preempted):
                continue
            while not self._grow(seq, extra_positions):
                victim = max((*self.prefilling, *self.running), key=_importance)
                self._forget([victim])
                self._requeue([victim])
                preempted.append(victim)
                if victim is seq:
                    break
        if preempted:
            log.info("KV blocks exhausted: preempted %d requests", len(preempted))
        return preempted

    def _grow(self, seq: Sequence, extra_positions: int) -> bool:
        """Blocks for `seq` and its guidance companion to hold their tokens plus `extra_positions`."""
        limit = self.config.max_context + MAX_SPECULATIVE
        for member in (seq, seq.companion):
            if member is None:
                continue
            positions = min(member.num_tokens + extra_positions, limit)
            if not self.blocks.missing(member, positions):
                continue
            if not self.blocks.grow(member, positions):
                return False
            self._grown[id(member)] = member
        return True

    def _cached_prefixes(self, seq: Sequence) -> list[tuple[Sequence, list[int]]]:
        """Each member (request, guidance companion) with the cached blocks its tokens begin with."""
        members = (seq,) if seq.companion is None else (seq, seq.companion)
        return [(member, self.blocks.cached_prefix(member) if self.blocks else []) for member in members]

    def _admit_blocks(self, hits: list[tuple[Sequence, list[int]]]) -> None:
        """The admitted members reference their cached prefixes, skip computing them, and take the rest."""
        for member, blocks in hits:
            self.blocks.attach(member, blocks)
            member.num_computed_tokens = len(blocks) * self.blocks.block_size
        self._grow(hits[0][0], 0)

    def _waits_for_a_prefix(self, seq: Sequence, hits: list[int], pending: dict[bytes, Sequence]) -> bool:
        """Whether the block after `seq`'s cached prefix is being computed this step by another request with other
        tokens: `seq` then waits a step and finds it cached (SGLang's in-batch prefix caching), instead of
        computing it again. Identical prompts (n samples) are admitted together and share in the runner."""
        hashes = self.blocks.block_hashes(seq, seq.num_tokens - 1)
        owner = pending.get(hashes[len(hits)]) if len(hashes) > len(hits) else None
        return owner is not None and owner.prompt_ids + owner.generated_ids != seq.prompt_ids + seq.generated_ids

    def _pending_blocks(self, planned: dict[int, int]) -> dict[bytes, Sequence]:
        """The full blocks the prompts being prefilled compute up to their planned ends: hash -> request."""
        pending: dict[bytes, Sequence] = {}
        for seq in self.prefilling:
            for digest in self.blocks.block_hashes(seq, planned[id(seq)]):
                pending.setdefault(digest, seq)
        return pending

    def _plan_prefills(self, num_decoding: int, now: float) -> list[PrefillChunk]:
        """Share the step's prompt tokens. Prompts longer than a chunk take at most half of them while requests
        wait (so that a long prompt does not hold short ones back for its whole prefill); waiting requests take
        what that leaves, in queue order; what is still left goes back to the long prompts."""
        chunk_size = self.config.max_num_batched_tokens - num_decoding
        budget = chunk_size
        if not num_decoding and not self.prefilling:
            # No stream to stall: a burst arriving at an idle engine is prefilled in bigger steps (whole prompts
            # only; a long prompt is still chunked), which batch better.
            budget *= IDLE_PREFILL_FACTOR
        long_room = chunk_size // 2 if len(self.waiting) else chunk_size
        planned = {id(seq): seq.num_computed_tokens for seq in self.prefilling}  # where each chunk ends

        def extend_long_prompts(limit: int) -> int:
            """Give the prompts being chunked up to `limit` more tokens, in order; returns how many it gave."""
            nonlocal budget
            given = 0
            for seq in self.prefilling:
                size = min(limit - given, budget, seq.num_tokens - planned[id(seq)])
                if size > 0:
                    planned[id(seq)] += size
                    budget -= size
                    given += size
            return given

        long_room -= extend_long_prompts(long_room)
        num_slots = self.num_slots
        out_of_tokens = False
        caching = self.blocks is not None and self.blocks.caching
        pending = self._pending_blocks(planned) if caching and len(self.waiting) else {}
        starts: dict[int, int] = {}  # id(request admitted now) -> where its first chunk starts (its cached prefix)
        adapters = {seq.options.adapter for seq in (*self.running, *self.prefilling)} - {""}

        def admit(seq: Sequence) -> bool:
            nonlocal budget, num_slots, out_of_tokens, long_room
            # An empty batch takes a guided request (two rows) even under a row limit lowered to one.
            fits = num_slots + seq.num_slots <= self.row_limit or (
                num_slots == 0 and seq.num_slots <= self.config.max_running
            )
            hits = self._cached_prefixes(seq)
            cached = len(hits[0][1]) * self.blocks.block_size if self.blocks else 0
            remaining = seq.num_tokens - cached
            # A prompt that fits in a chunk waits for a step with room for all of it; a longer one starts now,
            # within the long prompts' share.
            size = remaining if remaining <= chunk_size else min(budget, long_room)
            # Out of tokens (or KV blocks, or adapter slots), or waiting for a prefix computed this step, nobody
            # behind it (lower priority included) goes first: it is next in line. An idle engine takes it even if
            # it eats into the reserve.
            adapter = seq.options.adapter
            out_of_tokens = (
                out_of_tokens
                or (adapter != "" and adapter not in adapters and len(adapters) >= self.config.max_loras)
                or size <= 0
                or size > budget
                or not self._kv_fits(hits, num_slots == 0)
                or (caching and self._waits_for_a_prefix(seq, hits[0][1], pending))
            )
            if not fits or out_of_tokens:
                return False
            if self.blocks is not None:
                self._admit_blocks(hits)
                for digest in self.blocks.block_hashes(seq, cached + size) if caching else ():
                    pending.setdefault(digest, seq)
            if adapter:
                adapters.add(adapter)
            starts[id(seq)] = cached
            planned[id(seq)] = cached + size
            budget -= size
            if remaining > chunk_size:
                long_room -= size
            num_slots += seq.num_slots
            return True

        for seq in self.waiting.pop_while(admit):
            seq.start_time = now
            self.prefilling.append(seq)
        extend_long_prompts(budget)  # what the waiting requests left
        return [
            PrefillChunk(seq, seq.num_computed_tokens, planned[id(seq)], first=id(seq) in starts)
            for seq in self.prefilling
            if planned[id(seq)] > seq.num_computed_tokens
        ]

    def _kv_fits(self, hits: list[tuple[Sequence, list[int]]], engine_idle: bool) -> bool:
        if self.blocks is None:
            return True
        needed = sum(self.blocks.admission_cost(member, blocks) for member, blocks in hits)
        return self.blocks.can_admit(needed) or (engine_idle and needed <= self.blocks.num_free)

    def update(
        self, plan: StepPlan, output: ModelOutput, now: float, deadline_margin: float
    ) -> tuple[list[TokenEvent], list[Sequence]]:
        """Apply a step's output: append tokens and decide every finish (eos, length, criteria, constraint
        complete, max_time, the caller's deadline, an error). Returns the events and the requests that ended
        (whose rows the engine frees). Stop strings are the detokenizer's, off the engine thread."""
        self._regrow_row_limit()
        for chunk in plan.prefills:
            chunk.seq.num_computed_tokens = chunk.end
            if self.blocks is not None and chunk.seq.request_id not in output.errors:
                self.blocks.register(chunk.seq, chunk.end)
                if chunk.completes and chunk.seq.companion is not None:
                    self.blocks.register(chunk.seq.companion, chunk.seq.companion.num_tokens)
        completed = {id(chunk.seq) for chunk in plan.prefills if chunk.completes}
        self.running += [seq for seq in self.prefilling if id(seq) in completed]
        self.prefilling = [seq for seq in self.prefilling if id(seq) not in completed]
        events, ended = [], []
        stepped = [*plan.decodes, *(chunk.seq for chunk in plan.prefills)]
        for seq in stepped:
            error = output.errors.get(seq.request_id)
            result = output.results.get(seq.request_id)
            if error is not None:
                log.error("request %s failed: %s", seq.request_id, error)
                seq.finish(FinishReason.CANCELLED)  # ended; the error event tells the client why
                events.append(failure_event(seq, error))
                ended.append(seq)
                continue
            if result is None:
                continue  # a prompt chunk that is not the last
            seq.generated_ids.extend(result.token_ids)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if result.stop in _STOP_REASONS:
                seq.finish(_STOP_REASONS[result.stop])
            elif seq.params.max_time is not None and now - seq.start_time > seq.params.max_time:
                seq.finish(FinishReason.TIME_LIMIT)
            elif seq.options.partial_on_deadline and now + deadline_margin >= seq.options.deadline:
                seq.finish(FinishReason.TIME_LIMIT)
            if seq.is_finished:
                ended.append(seq)
            logprobs = (result.logprob,) if result.logprob is not None else ()
            events.append(
                TokenEvent(
                    seq.request_id, result.token_ids, seq.finish_reason, seq.num_prompt_tokens, logprobs=logprobs
                )
            )
        self._forget([seq for seq in ended if seq.request_id not in output.errors])
        self._forget([seq for seq in ended if seq.request_id in output.errors], keep_cached=False)
        return events, ended

    def recover_from_out_of_memory(self, plan: StepPlan) -> tuple[list[Sequence], list[TokenEvent]]:
        """Shrink to what fits after a step ran out of memory (the runner has dropped the rows this step's chunks
        touched). This step's prefills go back to the queue; without any, the newest running request is preempted
        (returned: its row is to be freed). A lone request that cannot fit fails instead of retrying forever."""
        victims = [chunk.seq for chunk in plan.prefills]
        to_release = []
        if not victims and self.running:
            victims = to_release = [max(self.running, key=lambda seq: seq.start_time or 0.0)]
        self._forget(victims, keep_cached=False)
        self.row_limit = max(1, self.num_slots)
        self._clean_steps = 0
        if not self.running and not self.prefilling and len(victims) == 1:
            seq = victims[0]
            log.error("request %s does not fit in memory even alone; failing it", seq.request_id)
            seq.finish(FinishReason.CANCELLED)
            return to_release, [failure_event(seq, "out of memory: the request does not fit")]
        self._requeue(victims)
        log.warning("out of memory: requeued %d requests, row limit now %d", len(victims), self.row_limit)
        return to_release, []

    def fail_all(self, plan: StepPlan, message: str) -> tuple[list[Sequence], list[TokenEvent]]:
        """A step failed for a reason no single request explains: every request in the batch ends with it."""
        failed = list({id(seq): seq for seq in (*self.running, *self.prefilling, *plan.admitted)}.values())
        self._forget(failed, keep_cached=False)
        for seq in failed:
            seq.finish(FinishReason.CANCELLED)
        return failed, [failure_event(seq, message) for seq in failed]

    def _apply_cancels(self) -> tuple[list[Sequence], list[TokenEvent]]:
        with self._cancel_lock:
            cancels, self._cancels = self._cancels, []
        released, events = [], []
        for request_id, reason in cancels:
            seq = self.waiting.remove(request_id)
            if seq is None:
                seq = next((s for s in (*self.prefilling, *self.running) if s.request_id == request_id), None)
                if seq is not None and not seq.is_finished:
                    self._forget([seq])
                    released.append(seq)
            if seq is None or seq.is_finished:
                continue  # already ended: a cancel racing a natural finish is a no-op
            seq.finish(reason)
            events.append(TokenEvent(seq.request_id, (), reason, seq.num_prompt_tokens))
        return released, events

    def _preempt_for_interactive(self) -> list[Sequence]:
        """Free rows for waiting interactive requests by sending the newest batch rows back to the queue. They
        keep their tokens (and sampler state) and are recomputed when readmitted; nothing they produced is lost."""
        needed = self.waiting.count_at(Priority.INTERACTIVE) - self.free_rows
        if needed <= 0:
            return []
        batch = [seq for seq in (*self.prefilling, *self.running) if seq.options.priority is Priority.BATCH]
        victims = sorted(batch, key=lambda seq: seq.start_time or 0.0, reverse=True)[:needed]
        self._forget(victims)
        self._requeue(victims)
        return victims

    def _requeue(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.num_computed_tokens = 0  # its KV is freed: it prefills again, generated tokens included
        self.waiting.requeue(seqs)

    def _forget(self, seqs: list[Sequence], keep_cached: bool = True) -> None:
        """Drop these requests from the batch; their KV blocks go back to the pool, the full blocks of what they
        computed registered for prefix caching (`keep_cached`; not after a failure, whose KV is unsure)."""
        leaving = {id(seq) for seq in seqs}
        running = {id(seq) for seq in self.running}
        if self.blocks is not None:
            for seq in seqs:
                for member in (seq, seq.companion):
                    if member is None:
                        continue
                    if keep_cached:  # a decoding row holds the KV of all its tokens but the newest
                        written = member.num_tokens - 1 if id(seq) in running else member.num_computed_tokens
                        self.blocks.register(member, written)
                    self.blocks.free(member)
                    self._grown.pop(id(member), None)
        self.prefilling = [seq for seq in self.prefilling if id(seq) not in leaving]
        self.running = [seq for seq in self.running if id(seq) not in leaving]

    def _regrow_row_limit(self) -> None:
        if self.row_limit < self.config.max_running:
            self._clean_steps += 1
            if self._clean_steps >= STEPS_TO_REGROW_ONE_ROW:
                self.row_limit += 1
                self._clean_steps = 0


def _importance(seq: Sequence) -> tuple[int, float]:
    """Sorts the most important first: interactive before batch, then the oldest."""
    return seq.options.priority, seq.start_time or 0.0


def failure_event(seq: Sequence, message: str) -> TokenEvent:
    """The event that ends a request with an error (the client gets INTERNAL with the message)."""
    return TokenEvent(seq.request_id, (), None, seq.num_prompt_tokens, error=message)
