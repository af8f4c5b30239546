"""The model runner: owns every tensor (KV cache, slot-indexed batch state) and runs one step for the engine.

A step prefills the rows admitted this step and decodes the rows already running, then processes all their
logits together, picks the next tokens and decides stops on the device. Exactly one device-to-host copy
happens per step: each row's new tokens (one, or more when speculation was accepted), stop code and logprobs.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from scheduler.batch_state import BatchState
from scheduler.constraints import TokenBitmasks, advance
from scheduler.decode_graphs import StaticDecoder
from scheduler.draft_model import DraftModel
from scheduler.kv_cache import SlotKVCache, decode_pass, prefill_pass
from scheduler.logits_processing import process_later_positions, process_logits
from scheduler.params import MAX_SPECULATIVE
from scheduler.plugins import apply_custom_processors, custom_stop_hits
from scheduler.prefix_cache import PrefixCache
from scheduler.request import Sequence, TokenLogprob
from scheduler.sampling import select_tokens
from scheduler.speculation import Drafts, accepted_counts, merge_drafts, prompt_lookup


class StopCode(enum.IntEnum):
    RUNNING = 0
    EOS_TOKEN = 1
    LENGTH = 2
    STOPPING_CRITERIA = 3
    CONSTRAINT_COMPLETE = 4


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and ("out of memory" in str(error) or "can't allocate memory" in str(error))
    )


@dataclass(frozen=True)
class StepOutput:
    results: list[RowResult]  # one per row, in row order
    failed: list[tuple[Sequence, str]]  # admitted requests whose own prefill raised; they hold no row
    row_errors: dict[int, str] = field(default_factory=dict)  # rows whose custom processor or criterion raised


@dataclass(frozen=True)
class TokenCounters:
    """Running totals of the runner's token savings (zeros for what is off)."""

    prefix_queried: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which copied from it instead of computed
    speculated: int = 0  # proposals verified by speculative decoding
    accepted: int = 0  # of which the model agreed with (each saves a forward pass)

    def __sub__(self, other: TokenCounters) -> TokenCounters:
        return TokenCounters(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True)
class RowResult:
    token_ids: tuple[int, ...]  # one, or more when speculation was accepted
    stop: StopCode
    logprob: TokenLogprob | None = None


class ModelRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        max_rows: int,
        max_context: int,
        seed: int = 0,
        prefix_cache_tokens: int = 0,
        assistant_model: PreTrainedModel | None = None,
        decode_mode: str = "auto",
        speculation_max_rows: int = 16,
    ) -> None:
        """`decode_mode`: "auto" runs plain decode steps from CUDA graphs on a GPU and eagerly on CPU, "eager"
        never captures (--no-cuda-graphs), "static" pads to the graphs' buckets even on CPU (what tests use to
        run the captured code path without a GPU). Speculation runs only in steps decoding at most
        `speculation_max_rows` rows: past that, verifying proposals costs more compute than it saves passes."""
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_rows = max_rows
        self.max_context = max_context
        self.cache = SlotKVCache.for_model(model, max_rows, max_context, spare_positions=MAX_SPECULATIVE)
        # A model that takes only a 2D padding mask cannot place several queries of one row: no speculation.
        self.speculation_max_rows = 0 if self.cache.layout.padding_mask_only else speculation_max_rows
        self.speculated_tokens = 0  # proposals verified since start
        self.accepted_tokens = 0  # of which the model agreed with
        self.state = BatchState(max_rows, self.vocab_size, self.cache.capacity, self.device)
        self.bitmasks = TokenBitmasks(max_rows, self.vocab_size, self.device)
        self.prefix_cache = PrefixCache(self.cache, prefix_cache_tokens) if prefix_cache_tokens else None
        self.draft = DraftModel(assistant_model, max_rows, max_context, MAX_SPECULATIVE) if assistant_model else None
        if decode_mode not in ("auto", "eager", "static"):
            raise ValueError(f"decode_mode must be auto, eager or static, got {decode_mode!r}")
        static = decode_mode == "static" or (decode_mode == "auto" and self.device.type == "cuda")
        self.static_decoder = StaticDecoder(model, self.cache, capture=True) if static else None
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.manual_seed(seed)

    @property
    def rows(self) -> list[Sequence]:
        """The running requests, in the order of each step's results (guidance companions are internal)."""
        return self.state.request_rows

    @property
    def num_rows(self) -> int:
        return len(self.state.request_slots)

    @property
    def num_slots(self) -> int:
        """Batch rows in use, guidance companions included: what the row limit bounds."""
        return self.state.num_rows

    def num_tokens_held(self) -> int:
        """Tokens of the running rows (prompt and generated): what the KV cache holds for them."""
        return sum(seq.num_tokens for seq in list(self.state.rows))

    def counters(self) -> TokenCounters:
        cache = self.prefix_cache
        return TokenCounters(
            prefix_queried=cache.queried_tokens if cache is not None else 0,
            prefix_hits=cache.hit_tokens if cache is not None else 0,
            speculated=self.speculated_tokens,
            accepted=self.accepted_tokens,
        )

    def kv_usage_ratio(self) -> float:
        return self.num_tokens_held() / (self.max_rows * self.max_context)

    @torch.inference_mode()
    def step(self, admitted: list[Sequence]) -> StepOutput:
        """Prefill `admitted` into new rows, decode the others, and pick every row's next token.

        A request whose own prefill raises is failed alone. Any other error leaves the batch as it was before
        the step (rows added by it are dropped, no token recorded) and propagates to the engine."""
        num_running = self.num_slots
        try:
            return self._step(num_running, admitted)
        except BaseException:
            self._release_slots(set(range(num_running, self.num_slots)))
            raise

    def _step(self, num_running: int, admitted: list[Sequence]) -> StepOutput:
        logits, failed = [], []
        drafts = self._propose(num_running) if num_running else None
        if num_running:
            decode_logits = self._decode(num_running, drafts)
            logits.append(decode_logits[:, 0])
        if admitted:
            prefill_logits, failed = self._prefill(admitted)
            if prefill_logits is not None:
                logits.append(prefill_logits)
            self.state.refresh_composition()
        if not logits:
            return StepOutput([], failed)
        scores = torch.cat(logits).float() if len(logits) > 1 else logits[0].float()
        slots = self.state.rows
        max_seq_length = max(seq.num_tokens for seq in slots)
        self.state.ensure_capacity(max_seq_length + 1 + (drafts.width if drafts is not None else 0))
        raw_scores = scores
        scores = process_logits(scores, self.state, max_seq_length)
        if self.state.constrained_rows:
            grammars = [slots[slot].grammar for slot in self.state.constrained_rows]
            scores = self.bitmasks.apply(scores, self.state.constrained_rows, grammars)
        row_errors: dict[int, str] = {}
        if self.state.uses_custom_processors:
            scores = apply_custom_processors(scores, slots, self.state.history, row_errors)
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
        request_slots = self.state.request_slots
        if len(request_slots) == len(slots):
            return StepOutput(results, failed, row_errors)
        row_of_slot = {slot: row for row, slot in enumerate(request_slots)}
        errors = {row_of_slot[slot]: message for slot, message in row_errors.items() if slot in row_of_slot}
        return StepOutput([results[slot] for slot in request_slots], failed, errors)

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

    def release(self, leaving: set[int]) -> None:
        """Free the requests at these indices of `rows` (and their guidance companions)."""
        state = self.state
        slots = {state.request_slots[row] for row in leaving}
        companions = {state.companion_slots[slot] for slot in slots if slot in state.companion_slots}
        if self.prefix_cache is not None:  # what a row generated can prefix a later prompt (the next chat turn)
            for slot in slots | companions:
                seq = state.rows[slot]
                self.prefix_cache.store((seq.prompt_ids + seq.generated_ids)[:-1], slot)  # the newest is not cached
        self._release_slots(slots | companions)

    @torch.inference_mode()
    def _release_slots(self, leaving: set[int]) -> None:
        """Free these slots; the last rows move into the holes so rows stay at 0..B-1."""
        if not leaving:
            return
        sources, destinations = self.state.remove_rows(leaving)
        self.cache.move_rows(sources, destinations)
        if self.draft is not None:
            self.draft.move_rows(sources, destinations, self.state.num_rows)
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
            state.max_new_tokens[:num_rows] - (lengths - state.prompt_length[:num_rows]), self.max_context - lengths
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
        if not (lookup_width or assistant_width) or num_rows > self.speculation_max_rows:
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

    def _prefill(self, admitted: list[Sequence]) -> tuple[torch.Tensor | None, list[tuple[Sequence, str]]]:
        """Prefill the admitted requests into new rows; the logits after each new row's last token, in row order.

        Fresh prompts of similar lengths are prefilled together, right-padded in one forward with the plain causal
        kernel: a padded position comes after every real one, so causality hides it, and each real token runs
        the computation `generate()` runs for it alone (tests compare the tokens). Requests that continue a cached
        prefix, repeat a prompt of this step (n samples: KV copied) or bring a guidance companion go one by one.
        A failure is attributable: a failed group is retried one by one, and a request whose own prefill raises
        fails alone (out of memory excepted, which the engine handles for the whole batch)."""
        by_slot: dict[int, torch.Tensor] = {}
        failed: list[tuple[Sequence, str]] = []
        prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}
        one_by_one: list[Sequence] = []
        fresh: dict[tuple[int, ...], Sequence] = {}
        for seq in admitted:
            tokens = tuple(seq.prompt_ids + seq.generated_ids)
            if seq.companion is None and self.prefix_cache is None and tokens not in fresh:
                fresh[tokens] = seq
            else:
                one_by_one.append(seq)
        for group in _padding_groups(list(fresh.values())):
            if len(group) == 1:
                one_by_one.insert(0, group[0])
                continue
            first_slot = self.num_slots
            try:
                by_slot.update(self._prefill_together(group, prefilled))
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self._release_slots(set(range(first_slot, self.num_slots)))
                one_by_one[:0] = group  # retried alone, so that only the request at fault fails
        for seq in one_by_one:
            first_slot = self.num_slots
            try:
                for member in (seq, seq.companion):
                    if member is not None:
                        slot = self.num_slots
                        by_slot[slot] = self._prefill_row(member, prefilled)
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                for slot in range(first_slot, self.num_slots):
                    by_slot.pop(slot, None)
                self._release_slots(set(range(first_slot, self.num_slots)))
                failed.append((seq, f"{type(error).__name__}: {error}"))
        logits = [by_slot[slot] for slot in sorted(by_slot)]
        return (torch.cat(logits) if logits else None), failed

    def _prefill_together(
        self, group: list[Sequence], prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Give each request of `group` a row (consecutive) and prefill them in one right-padded forward."""
        prompts = [seq.prompt_ids + seq.generated_ids for seq in group]
        lengths = [len(tokens) for tokens in prompts]
        width = max(lengths)
        slots = [self._add_row(seq) for seq in group]
        padded = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
        for row, tokens in enumerate(prompts):
            padded[row, : len(tokens)] = torch.tensor(tokens, device=self.device)
        last = sorted({length - 1 for length in lengths})  # the positions whose logits anyone needs
        keep = torch.tensor(last, device=self.device)
        logits = prefill_pass(self.model, self.cache, slots[0], padded, logits_to_keep=keep)
        result = {}
        for row, (slot, tokens) in enumerate(zip(slots, prompts)):
            result[slot] = logits[row : row + 1, last.index(len(tokens) - 1)]
            prefilled[tuple(tokens)] = (slot, result[slot])
        return result

    def _add_row(self, seq: Sequence) -> int:
        """A new row (slot) for `seq`, in the batch state and in the draft model's cache."""
        slot = self.state.add_row(seq)
        if self.draft is not None:
            self.draft.add_row()
        return slot

    def _prefill_row(self, seq: Sequence, prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Give `seq` a row and fill its KV cache; returns the logits after its last token."""
        tokens = seq.prompt_ids + seq.generated_ids
        self.cache.ensure_capacity(len(tokens) + 1)  # before a cached prefix is copied in
        row = self._add_row(seq)
        twin = prefilled.get(tuple(tokens))
        if twin is not None:
            self.cache.copy_prefix(twin[0], row, len(tokens))
            return twin[1]
        cached = self.prefix_cache.load(tokens, row) if self.prefix_cache is not None else 0
        input_ids = torch.tensor([tokens[cached:]], device=self.device)
        logits = prefill_pass(self.model, self.cache, row, input_ids, offset=cached)[:, -1]
        if self.prefix_cache is not None:
            self.prefix_cache.store(tokens, row)
        prefilled[tuple(tokens)] = (row, logits)
        return logits


def _padding_groups(seqs: list[Sequence], max_padding: float = 0.25) -> list[list[Sequence]]:
    """Requests sorted by length and cut into groups whose padding stays under `max_padding` of their tokens."""
    groups: list[list[Sequence]] = []
    for seq in sorted(seqs, key=lambda s: s.num_tokens):
        group = groups[-1] if groups else None
        if group and seq.num_tokens * (len(group) + 1) <= (1 + max_padding) * (
            sum(s.num_tokens for s in group) + seq.num_tokens
        ):
            group.append(seq)
        else:
            groups.append([seq])
    return groups
