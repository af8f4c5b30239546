"""The model runner: owns every tensor (KV cache, slot-indexed batch state) and executes the scheduler's plans.

A step decodes the running rows, computes the plan's prompt chunks, then processes the logits of every row that
gets a token together, picks the next tokens and decides stops on the device. Exactly one device-to-host copy
happens per step: each row's new tokens (one, or more when speculation was accepted), stop code and logprobs.

Slots are the runner's own business; callers name requests. Decoding rows hold slots 0..B-1 (the batch state's
rows, guidance companions included); requests still prefilling their prompt hold the slots after them, and
join the decoding rows when their last chunk is computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
from transformers import PreTrainedModel

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.params import MAX_SPECULATIVE
from genserve.scheduler.core.request import Sequence, TokenLogprob
from genserve.scheduler.core.snapshot import TokenCounters
from genserve.scheduler.core.step_plan import ModelOutput, PrefillChunk, RowResult, StepPlan, StopCode
from genserve.scheduler.features.constraints import advance
from genserve.scheduler.features.draft_model import DraftModel
from genserve.scheduler.features.logits_processing import LogitsStep, process_later_positions, process_logits
from genserve.scheduler.features.plugins import custom_stop_hits
from genserve.scheduler.features.sampling import select_tokens
from genserve.scheduler.features.speculation import Drafts, accepted_counts, merge_drafts, prompt_lookup
from genserve.scheduler.kv.blocks import BlockPool
from genserve.scheduler.kv.paged_cache import PagedKVCache
from genserve.scheduler.kv.prefix_cache import PrefixCache
from genserve.scheduler.kv.slot_cache import SlotKVCache, decode_pass, prefill_pass
from genserve.scheduler.model.batch_state import BatchState
from genserve.scheduler.model.cpu_linear import with_linear_kernel
from genserve.scheduler.model.decode_graphs import StaticDecoder


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))
    )


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, config: EngineConfig, assistant_model: PreTrainedModel | None = None
    ) -> None:
        self.config = config
        self.model = model = with_linear_kernel(model, config.linear_kernel, batch_hint=config.max_running)
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        max_rows, max_context = config.max_running, config.max_context
        if config.paged:
            memory = kv_memory_bytes(config.kv_cache_memory, self.device)
            self.cache = PagedKVCache.for_model(model, max_rows, max_context, MAX_SPECULATIVE, memory)
        else:
            self.cache = SlotKVCache.for_model(model, max_rows, max_context, spare_positions=MAX_SPECULATIVE)
        self._blocks_held: dict[int, int] = {}  # paged: id(request or companion) -> blocks the scheduler gave it
        # A model that takes only a 2D padding mask cannot place several queries of one row: no speculation.
        self.can_speculate = not self.cache.layout.padding_mask_only
        self.speculated_tokens = 0  # proposals verified since start
        self.accepted_tokens = 0  # of which the model agreed with
        self.state = BatchState(max_rows, self.vocab_size, min(self.cache.capacity, 256), self.device)
        self.prefilling: list[Sequence] = []  # slot = state.num_rows + index (companions included)
        tokens = config.prefix_cache_tokens
        self.prefix_cache = PrefixCache(self.cache, tokens) if tokens else None
        self.draft = DraftModel(assistant_model, max_rows, max_context, MAX_SPECULATIVE) if assistant_model else None
        mode = config.decode_mode
        static = mode == "static" or (mode == "auto" and self.device.type == "cuda")
        self.static_decoder = StaticDecoder(model, self.cache, capture=True) if static else None
        if static and self.device.type == "cuda" and isinstance(self.cache, PagedKVCache):
            self.cache.always_gather = True  # a captured pass cannot choose between reading homes and gathering
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.manual_seed(config.seed)

    @property
    def rows(self) -> list[Sequence]:
        """The decoding requests, in slot order (guidance companions are internal)."""
        return self.state.request_rows

    @property
    def num_slots(self) -> int:
        """Slots in use, prefilling requests and guidance companions included."""
        return self.state.num_rows + len(self.prefilling)

    def num_tokens_held(self) -> int:
        """KV positions held: the decoding rows' tokens and what the prefilling ones have computed so far."""
        decoding = sum(seq.num_tokens for seq in list(self.state.rows))
        return decoding + sum(seq.num_computed_tokens for seq in list(self.prefilling))

    def counters(self) -> TokenCounters:
        cache = self.prefix_cache
        return TokenCounters(
            prefix_queried=cache.queried_tokens if cache is not None else 0,
            prefix_hits=cache.hit_tokens if cache is not None else 0,
            speculated=self.speculated_tokens,
            accepted=self.accepted_tokens,
        )

    def kv_usage_ratio(self) -> float:
        return self.num_tokens_held() / (self.config.max_running * self.config.max_context)

    def block_pool(self) -> BlockPool | None:
        """A pool for the scheduler to hand out this paged cache's blocks; None with the slot cache."""
        cache = self.cache
        if not isinstance(cache, PagedKVCache):
            return None
        return BlockPool(cache.num_blocks, cache.block_size, self.config.kv_admission_reserve)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> ModelOutput:
        """Free the plan's released requests, then decode its decoding rows, compute its prompt chunks and pick
        the next token of every row that gets one.

        A request whose own prefill raises fails alone (in the output's errors). Any other error frees the rows
        this step's chunks touched (the scheduler requeues or fails them), records no token, and propagates."""
        self.release(plan.released)
        self._hold_blocks(plan.kv_blocks)
        if not plan.has_work:
            return ModelOutput()
        try:
            return self._execute(plan)
        except BaseException:
            self.release(chunk.seq for chunk in plan.prefills)
            raise

    def _hold_blocks(self, counts: tuple[tuple[Sequence, int], ...]) -> None:
        """The plan's block counts: rows that hold a slot take their blocks now, new ones when they get one."""
        for member, count in counts:
            self._blocks_held[id(member)] = count
            slot = self._slot(member)
            if slot is not None:
                self.cache.hold_blocks(slot, count)

    def _execute(self, plan: StepPlan) -> ModelOutput:
        num_decoding = self.state.num_rows
        logits = []
        speculates = plan.speculate and self.can_speculate and num_decoding
        drafts = self._propose(num_decoding) if speculates else None
        if num_decoding:
            decode_logits = self._decode(num_decoding, drafts)
            logits.append(decode_logits[:, 0])
        errors: dict[str, str] = {}
        if plan.prefills:
            prefill_logits = self._prefill(plan.prefills, errors)
            if prefill_logits is not None:
                logits.append(prefill_logits)
            self.state.refresh_composition()
        if not logits:
            return ModelOutput(errors=errors)
        scores = torch.cat(logits).float() if len(logits) > 1 else logits[0].float()
        slots = self.state.rows
        max_seq_length = max(seq.num_tokens for seq in slots)
        self.state.ensure_capacity(max_seq_length + 1 + (drafts.width if drafts is not None else 0))
        raw_scores = scores
        row_errors: dict[int, str] = {}
        scores = process_logits(scores, self.state, LogitsStep(max_seq_length, row_errors))
        next_tokens, final_scores = select_tokens(scores, self.state, self.shared_generator)
        if self.state.guidance is not None:  # the unconditional branch continues with its request's token
            guidance = self.state.guidance
            next_tokens = next_tokens.index_put((guidance.companion,), next_tokens[guidance.guided])
        # Every row emits its pick; a speculating row also the proposals the model agreed with, and the pick after.
        emitted, counts = next_tokens.unsqueeze(1), torch.ones_like(next_tokens)
        proposed = accepted = torch.zeros_like(next_tokens)
        if drafts is not None:
            emitted, counts, proposed, accepted = self._verify(drafts, decode_logits, next_tokens)
        counts, stops = self._limit(emitted, counts)
        self.state.record_tokens(emitted, counts)
        if self.state.uses_custom_criteria:
            hits = custom_stop_hits(scores, slots, self.state.history, row_errors)
            stops = torch.where(hits & (stops == int(StopCode.RUNNING)), int(StopCode.STOPPING_CRITERIA), stops)
        columns = [counts, stops, proposed, accepted, emitted]
        columns = [column.double().unsqueeze(1) if column.dim() == 1 else column.double() for column in columns]
        num_top = self.state.max_top_logprobs
        if num_top >= 0:
            wants_processed = self.state.processed_logprob_rows
            if wants_processed is not None:
                raw_scores = torch.where(wants_processed.unsqueeze(1), final_scores, raw_scores)
            columns += self._logprob_columns(raw_scores, next_tokens, num_top)
        # The one device-to-host copy of the step (token ids are exact in float64).
        host_rows = torch.cat(columns, dim=1).tolist()
        results = [self._row_result(seq, values, emitted.shape[1], num_top) for seq, values in zip(slots, host_rows)]
        self.speculated_tokens += sum(int(values[2]) for values in host_rows)
        self.accepted_tokens += sum(int(values[3]) for values in host_rows)
        if self.state.constrained_rows:
            results = self._advance_constraints(results, row_errors)
        errors.update((slots[slot].request_id, message) for slot, message in row_errors.items())
        by_request = {seq.request_id: result for seq, result in zip(slots, results) if not seq.is_companion}
        return ModelOutput(by_request, errors)

    def _advance_constraints(self, results: list[RowResult], row_errors: dict[int, str]) -> list[RowResult]:
        """Feed each constrained row's token to its matcher; a complete constraint ends the row."""
        results = list(results)
        for slot in self.state.constrained_rows:
            result = results[slot]
            if result.stop is not StopCode.RUNNING or slot in row_errors:
                continue  # the row ends here anyway
            try:
                if advance(self.state.rows[slot].grammar, result.token_ids[0]):
                    results[slot] = dataclasses.replace(result, stop=StopCode.CONSTRAINT_COMPLETE)
            except RuntimeError as error:
                row_errors[slot] = str(error)
        return results

    @staticmethod
    def _logprob_columns(scores: torch.Tensor, next_tokens: torch.Tensor, num_top: int) -> list[torch.Tensor]:
        logprobs = torch.log_softmax(scores, dim=-1)
        chosen = logprobs.gather(1, next_tokens.unsqueeze(1))
        rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1
        if num_top == 0:
            return [chosen.double(), rank.double()]
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        return [chosen.double(), rank.double(), top_ids.double(), top_values.double()]

    @staticmethod
    def _row_result(seq: Sequence, values: list[float], width: int, num_top: int) -> RowResult:
        """One row of the host copy: count, stop, proposed, accepted, `width` tokens, then any logprobs (the
        chosen token's, its rank, the top ids and their logprobs)."""
        count, code = int(values[0]), StopCode(int(values[1]))
        tokens = tuple(int(token) for token in values[4 : 4 + count])
        wanted = seq.options.top_logprobs
        if wanted is None:
            return RowResult(tokens, code)
        chosen, rank, rest = values[4 + width], int(values[5 + width]), values[6 + width :]
        ids, logprobs = rest[:num_top], rest[num_top:]
        top = tuple((int(i), lp) for i, lp in zip(ids[:wanted], logprobs[:wanted]))
        return RowResult(tokens, code, TokenLogprob(tokens[0], chosen, top, rank))

    def release(self, seqs: Iterable[Sequence], keep_blocks: bool = False) -> None:
        """Free these requests' rows (and their guidance companions'), wherever they are; unknown ones are skipped.
        `keep_blocks`: they keep their KV blocks (paged cache), to take a row again in this step."""
        leaving = {id(member) for seq in seqs for member in (seq, seq.companion) if member is not None}
        if not leaving:
            return
        if not keep_blocks:
            for key in leaving:
                self._blocks_held.pop(key, None)
        rows = {slot for slot, seq in enumerate(self.state.rows) if id(seq) in leaving}
        prefilling = {index for index, seq in enumerate(self.prefilling) if id(seq) in leaving}
        if self.prefix_cache is not None:  # what a row generated can prefix a later prompt (the next chat turn)
            for slot in rows:
                seq = self.state.rows[slot]
                self.prefix_cache.store((seq.prompt_ids + seq.generated_ids)[:-1], slot)  # the newest is not cached
        self._free(rows, prefilling)

    @torch.inference_mode()
    def _free(self, rows: set[int], prefilling: set[int]) -> None:
        """Free decoding rows (the last rows move into the holes, so they stay at 0..B-1) and prefilling entries
        (the others shift down behind the decoding rows, in order): one copy per layer for all the moves."""
        if not rows and not prefilling:
            return
        old_num_rows = self.state.num_rows
        sources, destinations = self.state.remove_rows(rows) if rows else ([], [])
        if self.draft is not None and rows:
            self.draft.move_rows(sources, destinations, self.state.num_rows)
        kept = [index for index in range(len(self.prefilling)) if index not in prefilling]
        for new, old in enumerate(kept):
            if old_num_rows + old != self.state.num_rows + new:
                sources.append(old_num_rows + old)
                destinations.append(self.state.num_rows + new)
        if isinstance(self.cache, PagedKVCache):  # before the moves: the holes' blocks are free for them
            self.cache.free_rows(rows | {old_num_rows + index for index in prefilling})
        self.prefilling = [self.prefilling[index] for index in kept]
        self.cache.move_rows(sources, destinations)
        if rows:
            self.state.refresh_composition()

    def _limit(self, emitted: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut each row's emitted tokens at its first eos and at its length limits; returns the counts kept and
        the stop codes."""
        state, num_rows, width = self.state, emitted.shape[0], emitted.shape[1]
        offsets = torch.arange(width, device=self.device)
        is_eos = state.eos_mask[:num_rows].gather(1, emitted) & state.stops_on_eos[:num_rows].unsqueeze(1)
        is_eos &= offsets < counts.unsqueeze(1)
        first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), width)
        lengths = state.seq_length[:num_rows]
        room = torch.minimum(
            state.max_new_tokens[:num_rows] - (lengths - state.prompt_length[:num_rows]),
            self.config.max_context - lengths,
        )
        hits_eos = first_eos + 1 <= torch.minimum(counts, room)
        counts = torch.where(hits_eos, first_eos + 1, torch.minimum(counts, room))
        hits_length = counts >= room
        stops = torch.where(
            hits_eos, int(StopCode.EOS_TOKEN), torch.where(hits_length, int(StopCode.LENGTH), int(StopCode.RUNNING))
        )
        return counts, stops

    def _propose(self, num_rows: int) -> Drafts | None:
        """This step's proposals for the running rows, or None when none of them speculates."""
        state = self.state
        lookup_width, assistant_width = state.max_lookup_tokens, state.max_assistant_tokens if self.draft else 0
        if not (lookup_width or assistant_width):
            return None
        lengths = [seq.num_tokens for seq in state.rows[:num_rows]]
        state.ensure_capacity(max(lengths) + 1 + max(lookup_width, assistant_width))
        proposals = []
        if lookup_width:
            history = state.history[:num_rows, : max(lengths)]
            proposals.append(
                prompt_lookup(history, state.seq_length[:num_rows], state.lookup_tokens[:num_rows], lookup_width)
            )
        if assistant_width:
            proposals.append(self.draft.propose(state, lengths, state.assistant_tokens[:num_rows], assistant_width))
        return merge_drafts(proposals)

    def _verify(
        self, drafts: Drafts, decode_logits: torch.Tensor, next_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The speculating rows' tokens: the model's picks at every proposed position, as many as it agreed
        with plus one. Rows past the decoding ones (prefilled this step) keep their single pick."""
        later = decode_logits[:, 1:].float()
        num_decoding = later.shape[0]
        picks = torch.cat([next_tokens[:num_decoding, None], process_later_positions(later, self.state).argmax(-1)], 1)
        accepted = accepted_counts(drafts, picks)
        emitted = next_tokens.unsqueeze(1).repeat(1, picks.shape[1])
        emitted[:num_decoding] = picks
        padding = torch.zeros(next_tokens.shape[0] - num_decoding, dtype=torch.long, device=self.device)
        accepted, proposed = torch.cat([accepted, padding]), torch.cat([drafts.counts, padding])
        return emitted, 1 + accepted, proposed, accepted

    def _decode(self, num_rows: int, drafts: Drafts | None) -> torch.Tensor:
        """Logits [rows, 1 + proposals, vocab]: after each row's newest token, and after each of its proposals."""
        state = self.state
        width = 1 + (drafts.width if drafts is not None else 0)
        read_length = max(seq.num_tokens for seq in self.state.rows[:num_rows]) + width - 1
        lengths = state.seq_length[:num_rows]
        # The newest token is in the history but not yet in the cache; proposals follow it.
        positions = (lengths - 1).unsqueeze(1) + torch.arange(width, device=self.device)
        tokens = state.history[torch.arange(num_rows, device=self.device), lengths - 1].unsqueeze(1)
        if drafts is None and self.static_decoder is not None:
            return self.static_decoder.logits(tokens, positions, read_length).unsqueeze(1)
        if drafts is not None:
            tokens = torch.cat([tokens, drafts.tokens], dim=1)
        return decode_pass(self.model, self.cache, tokens, positions, read_length)

    def _prefill(self, chunks: tuple[PrefillChunk, ...], errors: dict[str, str]) -> torch.Tensor | None:
        """Compute the plan's prompt chunks. Requests whose prompt is now complete join the decoding rows, in plan
        order; returns the logits after each one's last token, in that order.

        Whole fresh prompts of similar lengths run together, right-padded in one forward with the plain causal
        kernel: a padded position comes after every real one, so causality hides it, and each real token runs
        the computation `generate()` runs for it alone (tests compare the tokens). Chunks of longer prompts,
        requests that continue a cached prefix, repeat a prompt of this step (n samples: KV copied) or bring a
        guidance companion go one by one, each after the positions its slot already holds. A failure is
        attributable: a failed group is retried one by one, and a request whose own prefill raises fails alone
        (out of memory excepted, which the engine handles for the whole batch)."""
        last_logits: dict[int, torch.Tensor] = {}  # id(request or companion) -> logits after its last token
        prefilled: dict[tuple[int, ...], tuple[Sequence, torch.Tensor]] = {}
        whole: dict[tuple[int, ...], PrefillChunk] = {}
        one_by_one: list[PrefillChunk] = []
        for chunk in chunks:
            tokens = tuple(chunk.seq.prompt_ids + chunk.seq.generated_ids)
            alone = chunk.seq.companion is not None or self.prefix_cache is not None or tokens in whole
            if chunk.start == 0 and chunk.completes and not alone:
                whole[tokens] = chunk
            else:
                one_by_one.append(chunk)
        for group in _padding_groups(list(whole.values())):
            if len(group) == 1:
                one_by_one.insert(0, group[0])
                continue
            try:
                last_logits.update(self._prefill_together(group, prefilled))
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self.release((chunk.seq for chunk in group), keep_blocks=True)
                one_by_one[:0] = group  # retried alone, so that only the request at fault fails
        for chunk in one_by_one:
            try:
                last_logits.update(self._prefill_chunk(chunk, prefilled))
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self.release([chunk.seq])
                errors[chunk.seq.request_id] = f"{type(error).__name__}: {error}"
        joined = []
        for chunk in chunks:
            if chunk.completes and chunk.seq.request_id not in errors:
                for member in (chunk.seq, chunk.seq.companion):
                    if member is not None:
                        self._join(member)
                        joined.append(last_logits[id(member)])
        return torch.cat(joined) if joined else None

    def _prefill_together(
        self, group: list[PrefillChunk], prefilled: dict[tuple[int, ...], tuple[Sequence, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Give each request of `group` a slot (consecutive) and prefill their whole prompts in one right-padded
        forward."""
        prompts = [chunk.seq.prompt_ids + chunk.seq.generated_ids for chunk in group]
        lengths = [len(tokens) for tokens in prompts]
        width = max(lengths)
        slots = [self._add_prefilling(chunk.seq) for chunk in group]
        padded = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, tokens in enumerate(prompts):
            padded[row, : len(tokens)] = torch.tensor(tokens, device=self.device)
        last = sorted({length - 1 for length in lengths})  # the positions whose logits anyone needs
        keep = torch.tensor(last, device=self.device)
        logits = prefill_pass(self.model, self.cache, slots[0], padded, logits_to_keep=keep)
        result = {}
        for row, (chunk, tokens) in enumerate(zip(group, prompts)):
            result[id(chunk.seq)] = logits[row : row + 1, last.index(len(tokens) - 1)]
            prefilled[tuple(tokens)] = (chunk.seq, result[id(chunk.seq)])
        return result

    def _prefill_chunk(
        self, chunk: PrefillChunk, prefilled: dict[tuple[int, ...], tuple[Sequence, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Compute one chunk in its request's slot (a first chunk takes a slot, and one for a guidance companion,
        whose prompt is prefilled whole with its request's last chunk). The logits after the last token of each
        member that completed."""
        seq = chunk.seq
        if chunk.start == 0:
            for member in (seq, seq.companion):
                if member is not None:
                    self._add_prefilling(member)
        logits = {}
        computed = self._compute(seq, chunk.start, chunk.end, prefilled)
        if computed is not None:
            logits[id(seq)] = computed
        if chunk.completes and seq.companion is not None:
            logits[id(seq.companion)] = self._compute(seq.companion, 0, None, prefilled)
        return logits

    def _compute(
        self,
        seq: Sequence,
        start: int,
        end: int | None,
        prefilled: dict[tuple[int, ...], tuple[Sequence, torch.Tensor]],
    ) -> torch.Tensor | None:
        """Fill positions [start, end) of `seq`'s slot (end None: to its last token) from a twin prefilled this
        step, the prefix cache, or a forward after what the slot holds. The logits after its last token when the
        slot now holds all of it."""
        tokens = seq.prompt_ids + seq.generated_ids
        end = len(tokens) if end is None else end
        slot = self._slot(seq)
        self.cache.ensure_capacity(len(tokens) + 1)  # before a cached prefix or a twin is copied in
        twin = prefilled.get(tuple(tokens)) if start == 0 and end == len(tokens) else None
        if twin is not None:
            self.cache.copy_prefix(self._slot(twin[0]), slot, len(tokens))
            return twin[1]
        cached = self.prefix_cache.load(tokens, slot) if self.prefix_cache is not None and start == 0 else 0
        begin = max(start, cached)
        if begin >= end:
            return None  # the prefix cache held this whole chunk
        input_ids = torch.tensor([tokens[begin:end]], device=self.device)
        logits = prefill_pass(self.model, self.cache, slot, input_ids, offset=begin)[:, -1]
        if end < len(tokens):
            return None
        if self.prefix_cache is not None:
            self.prefix_cache.store(tokens, slot)
        prefilled[tuple(tokens)] = (seq, logits)
        return logits

    def _add_prefilling(self, seq: Sequence) -> int:
        """A slot for `seq`, after the decoding rows and the requests already prefilling."""
        self.prefilling.append(seq)
        slot = self.state.num_rows + len(self.prefilling) - 1
        if isinstance(self.cache, PagedKVCache):
            self.cache.hold_blocks(slot, self._blocks_held[id(seq)])
        return slot

    def _slot(self, seq: Sequence) -> int | None:
        """`seq`'s slot, or None when it holds none."""
        for slot, row in enumerate(self.state.rows):
            if row is seq:
                return slot
        for index, entry in enumerate(self.prefilling):
            if entry is seq:
                return self.state.num_rows + index
        return None

    def _prefilling_index(self, seq: Sequence) -> int:
        return next(index for index, entry in enumerate(self.prefilling) if entry is seq)

    def _join(self, seq: Sequence) -> None:
        """`seq`'s prompt is computed: its slot becomes the next decoding row (swapped to the front of the
        prefilling slots first if another request, still prefilling, is ahead of it)."""
        index = self._prefilling_index(seq)
        first = self.state.num_rows
        if index:
            self.cache.move_rows([first, first + index], [first + index, first])
            self.prefilling[0], self.prefilling[index] = self.prefilling[index], self.prefilling[0]
        self.prefilling.pop(0)
        self.state.add_row(seq)
        if self.draft is not None:
            self.draft.add_row()


def kv_memory_bytes(setting: float, device: torch.device) -> int:
    """--kv-cache-memory in bytes: a size, or (<= 1) that fraction of the memory the device has free."""
    if setting > 1:
        return int(setting)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * setting)


def _padding_groups(chunks: list[PrefillChunk], max_padding: float = 0.25) -> list[list[PrefillChunk]]:
    """Whole prompts sorted by length and cut into groups whose padding stays under `max_padding` of their
    tokens."""
    groups: list[list[PrefillChunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.num_tokens):
        group = groups[-1] if groups else None
        if group and chunk.num_tokens * (len(group) + 1) <= (1 + max_padding) * (
            sum(c.num_tokens for c in group) + chunk.num_tokens
        ):
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
