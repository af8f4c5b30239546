"""The model runner: owns every tensor (KV cache, slot-indexed batch state) and runs one step for the engine.

A step prefills the rows admitted this step and decodes the rows already running, then processes all their
logits together, picks the next tokens and decides stops on the device. Exactly one device-to-host copy
happens per step: the (next token, stop code) pairs the engine needs.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from scheduler.batch_state import BatchState
from scheduler.constraints import TokenBitmasks, advance
from scheduler.kv_cache import SlotKVCache
from scheduler.logits_processing import process_logits
from scheduler.plugins import apply_custom_processors, custom_stop_hits
from scheduler.prefix_cache import PrefixCache
from scheduler.request import Sequence, TokenLogprob
from scheduler.sampling import select_tokens


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
class RowResult:
    token_id: int
    stop: StopCode
    logprob: TokenLogprob | None = None


class ModelRunner:
    def __init__(
        self, model: PreTrainedModel, max_rows: int, max_context: int, seed: int = 0, prefix_cache_tokens: int = 0
    ) -> None:
        config = model.config.get_text_config()
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_rows = max_rows
        self.max_context = max_context
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        num_heads = config.num_attention_heads
        self.cache = SlotKVCache(
            num_layers=config.num_hidden_layers,
            max_rows=max_rows,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            max_context=max_context,
            dtype=next(model.parameters()).dtype,
            device=self.device,
        )
        self.state = BatchState(max_rows, self.vocab_size, self.cache.capacity, self.device)
        self.bitmasks = TokenBitmasks(max_rows, self.vocab_size, self.device)
        self.prefix_cache = PrefixCache(self.cache, prefix_cache_tokens) if prefix_cache_tokens else None
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.manual_seed(seed)

    @property
    def rows(self) -> list[Sequence]:
        """The running requests, in the order of each step's results (guidance companions are internal)."""
        state = self.state
        return (
            state.rows if len(state.request_slots) == state.num_rows else [state.rows[s] for s in state.request_slots]
        )

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

    def prefix_cache_counts(self) -> tuple[int, int]:
        """(prompt tokens looked up, tokens found) since start; zeros without prefix caching."""
        cache = self.prefix_cache
        return (cache.queried_tokens, cache.hit_tokens) if cache is not None else (0, 0)

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
        if num_running:
            logits.append(self._decode(num_running))
        if admitted:
            prefill_logits, failed = self._prefill(admitted)
            if prefill_logits is not None:
                logits.append(prefill_logits)
            self.state.refresh_composition()
        if not logits:
            return StepOutput([], failed)
        scores = torch.cat(logits).float() if len(logits) > 1 else logits[0].float()
        if self.logit_softcap:
            scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap
        slots = self.state.rows
        max_seq_length = max(seq.num_tokens for seq in slots)
        self.state.ensure_capacity(max_seq_length + 1)
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
        stops = self._stop_codes(next_tokens)
        self.state.record_tokens(next_tokens)
        if self.state.uses_custom_criteria:
            hits = custom_stop_hits(scores, slots, self.state.history, row_errors)
            stops = torch.where(hits & (stops == int(StopCode.RUNNING)), int(StopCode.STOPPING_CRITERIA), stops)
        columns = [next_tokens.double().unsqueeze(1), stops.double().unsqueeze(1)]
        num_top = self.state.max_top_logprobs
        if num_top >= 0:
            wants_processed = self.state.processed_logprob_rows
            if wants_processed is not None:
                raw_scores = torch.where(wants_processed.unsqueeze(1), final_scores, raw_scores)
            columns += self._logprob_columns(raw_scores, next_tokens, num_top)
        # The one device-to-host copy of the step (token ids are exact in float64).
        host_rows = torch.cat(columns, dim=1).tolist()
        results = [self._row_result(seq, values, num_top) for seq, values in zip(slots, host_rows)]
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
                if advance(self.state.rows[slot].grammar, result.token_id):
                    results[slot] = dataclasses.replace(result, stop=StopCode.CONSTRAINT_COMPLETE)
            except RuntimeError as error:
                row_errors[slot] = str(error)
        return results

    @staticmethod
    def _logprob_columns(scores: torch.Tensor, next_tokens: torch.Tensor, num_top: int) -> list[torch.Tensor]:
        logprobs = torch.log_softmax(scores, dim=-1)
        chosen = logprobs.gather(1, next_tokens.unsqueeze(1))
        if num_top == 0:
            return [chosen.double()]
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        return [chosen.double(), top_ids.double(), top_values.double()]

    @staticmethod
    def _row_result(seq: Sequence, values: list[float], num_top: int) -> RowResult:
        token, code = int(values[0]), StopCode(int(values[1]))
        wanted = seq.options.top_logprobs
        if wanted is None:
            return RowResult(token, code)
        ids, logprobs = values[3 : 3 + num_top], values[3 + num_top :]
        top = tuple((int(i), lp) for i, lp in zip(ids[:wanted], logprobs[:wanted]))
        return RowResult(token, code, TokenLogprob(token, values[2], top))

    def release(self, leaving: set[int]) -> None:
        """Free the requests at these indices of `rows` (and their guidance companions)."""
        state = self.state
        slots = {state.request_slots[row] for row in leaving}
        slot_of = {id(seq): slot for slot, seq in enumerate(state.rows)}
        companions = {slot_of.get(id(state.rows[slot].companion)) for slot in slots} - {None}
        self._release_slots(slots | companions)

    @torch.inference_mode()
    def _release_slots(self, leaving: set[int]) -> None:
        """Free these slots; the last rows move into the holes so rows stay at 0..B-1."""
        if not leaving:
            return
        sources, destinations = self.state.remove_rows(leaving)
        if sources:
            self.cache.move_rows(
                torch.tensor(sources, device=self.device), torch.tensor(destinations, device=self.device)
            )
        self.state.refresh_composition()

    def _stop_codes(self, next_tokens: torch.Tensor) -> torch.Tensor:
        state, num_rows = self.state, next_tokens.shape[0]
        hits_eos = (
            state.eos_mask[:num_rows].gather(1, next_tokens.unsqueeze(1)).squeeze(1) & state.stops_on_eos[:num_rows]
        )
        generated = state.seq_length[:num_rows] - state.prompt_length[:num_rows] + 1
        hits_length = (generated >= state.max_new_tokens[:num_rows]) | (
            state.seq_length[:num_rows] + 1 >= self.max_context
        )
        return torch.where(
            hits_eos, int(StopCode.EOS_TOKEN), torch.where(hits_length, int(StopCode.LENGTH), int(StopCode.RUNNING))
        )

    def _decode(self, num_rows: int) -> torch.Tensor:
        state = self.state
        read_length = max(seq.num_tokens for seq in self.state.rows)
        self.cache.ensure_capacity(read_length)
        lengths = state.seq_length[:num_rows]
        positions = lengths - 1  # the newest token is in the history but not yet in the cache
        last_tokens = state.history[torch.arange(num_rows, device=self.device), positions]
        mask = torch.arange(read_length, device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        self.cache.begin_decode(positions, read_length)
        hidden = self._forward(last_tokens.unsqueeze(1), positions.unsqueeze(1), mask[:, None, None, :])
        return self.lm_head(hidden[:, -1])

    def _prefill(self, admitted: list[Sequence]) -> tuple[torch.Tensor | None, list[tuple[Sequence, str]]]:
        """One forward per new row, unpadded: prefill is compute-bound here, so padding would be pure waste, and
        each row then runs exactly the computation `generate()` runs for it alone (causal kernel, no mask).
        Being per request, a failure is attributable: that request fails alone (out of memory excepted,
        which the engine handles for the whole batch)."""
        last_hidden, failed = [], []
        # Requests with the same tokens (n samples of one prompt) share one prefill: their KV is copied, which
        # is bitwise what a prefill of their own would compute.
        prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}
        for seq in admitted:
            first_slot = self.num_slots
            try:
                hidden = [self._prefill_row(member, prefilled) for member in (seq, seq.companion) if member]
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                self._release_slots(set(range(first_slot, self.num_slots)))
                failed.append((seq, f"{type(error).__name__}: {error}"))
                continue
            last_hidden += hidden
        return (self.lm_head(torch.cat(last_hidden)) if last_hidden else None), failed

    def _prefill_row(self, seq: Sequence, prefilled: dict[tuple[int, ...], tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Give `seq` a row and fill its KV cache; returns the hidden state of its last token."""
        tokens = seq.prompt_ids + seq.generated_ids
        self.cache.ensure_capacity(len(tokens) + 1)
        row = self.state.add_row(seq)
        twin = prefilled.get(tuple(tokens))
        if twin is not None:
            self.cache.copy_prefix(twin[0], row, len(tokens))
            return twin[1]
        cached = self.prefix_cache.load(tokens, row) if self.prefix_cache is not None else 0
        self.cache.begin_prefill(row, 1, offset=cached)
        input_ids = torch.tensor([tokens[cached:]], device=self.device)
        positions = torch.arange(cached, len(tokens), device=self.device).unsqueeze(0)
        mask = None  # a plain causal prefill, unless it continues a cached prefix:
        if cached:
            mask = torch.ones(len(tokens) - cached, len(tokens), dtype=torch.bool, device=self.device)
            mask = mask.tril(diagonal=cached)[None, None]
        hidden = self._forward(input_ids, positions, mask)[:, -1]
        if self.prefix_cache is not None:
            self.prefix_cache.store(tokens, row)
        prefilled[tuple(tokens)] = (row, hidden)
        return hidden

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        output = self.decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=self.cache, use_cache=True
        )
        return output.last_hidden_state
