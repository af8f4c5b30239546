"""Per-row logits processors, each a feature of the persistent batch, with the semantics and order of
`transformers`' LogitsProcessorList.

A `LogitsFeature` owns its per-row state, in the spirit of vLLM V1's `LogitsProcessor.update_state`: tensors
indexed by slot (`slot_tensors`; the batch moves them with their rows), written when a row joins (`add_row`),
and host-side facts rebuilt when rows join or leave (`refresh`, which also says whether any row uses it, so the
hot loop never asks the device). `apply` processes the whole batch's scores [B, V]: rows that don't use the
feature pass unchanged. `process_logits` is a loop over the features some row uses, in `LOGITS_FEATURES` order:
HF's (`GenerationMixin._get_logits_processor`: classifier-free guidance, repetition penalty, no-repeat n-gram,
bad words, min_new_tokens, allowed_token_ids where its prefix_allowed_tokens_fn runs), then the OpenAI-style
presence/frequency penalties and logit_bias (not in HF; after its processors, so unset they change nothing),
then a grammar constraint's mask and the request's custom processors. The sampling rows' warpers (temperature,
top-k, top-p, ...) come after these, in warpers.py.

A new processor is a subclass here, an entry in `LOGITS_FEATURES`, and its parameter in params.py and the proto.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import Sequence
from genserve.scheduler.features.constraints import TokenBitmasks
from genserve.scheduler.features.plugins import apply_custom_processors

if TYPE_CHECKING:
    from genserve.scheduler.model.batch_state import BatchState

NEG_INF = float("-inf")


@dataclass
class LogitsStep:
    """What a step's processing may read besides the batch, and where a row that fails is reported."""

    max_seq_length: int  # the longest row's tokens (the width of the history worth reading)
    row_errors: dict[int, str]  # slot -> why that row's request fails (a custom processor raised, ...)


class LogitsFeature:
    """A per-row logits processor of the persistent batch (see the module docstring)."""

    # Speculating rows run only features that are the same at every position (see
    # `GenerationParameters.allows_speculation`); those apply at the proposed positions too.
    applies_to_proposals = False

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.max_rows, self.vocab_size, self.device = max_rows, vocab_size, device
        self.is_used = False

    @property
    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        """Tensors indexed by slot in their first dimension: the batch moves their rows when rows move."""
        return ()

    def add_row(self, slot: int, seq: Sequence) -> None:
        """Write `seq`'s values at `slot` (it joins the batch)."""

    def refresh(self, rows: list[Sequence]) -> bool:
        """Rows joined or left (`rows`: every slot's row, in order): rebuild host-side facts; whether any row
        uses the feature."""
        raise NotImplementedError

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        raise NotImplementedError

    def apply_at_proposals(self, scores: torch.Tensor, state: BatchState) -> torch.Tensor:
        """`scores` [B, K, V]: the speculating rows' logits at their K proposed positions."""
        raise NotImplementedError

    def _per_row(self, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return torch.zeros((self.max_rows, *shape), dtype=dtype, device=self.device)


class PerRowValue(LogitsFeature):
    """A feature whose per-row state is one value of the row's parameters; a row whose value is `identity` does
    not use it."""

    dtype = torch.float32
    identity: float = 0

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        super().__init__(max_rows, vocab_size, device)
        self.values = self._per_row(self.dtype)

    def value(self, params: GenerationParameters) -> float:
        raise NotImplementedError

    @property
    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.values,)

    def add_row(self, slot: int, seq: Sequence) -> None:
        self.values[slot] = self.value(seq.params)

    def refresh(self, rows: list[Sequence]) -> bool:
        return any(self.value(seq.params) != self.identity for seq in rows)


@dataclass
class GuidancePairs:
    """Classifier-free guidance pairs: the logits of row `guided` are steered away from those of `companion`."""

    guided: torch.Tensor
    companion: torch.Tensor
    scale: torch.Tensor  # [G, 1]


class ClassifierFreeGuidance(LogitsFeature):
    """HF's UnbatchedClassifierFreeGuidanceLogitsProcessor with the unconditional branch as a companion row:
    guided = scale * (log_softmax(conditional) - log_softmax(unconditional)) + log_softmax(unconditional)."""

    pairs: GuidancePairs | None = None

    def refresh(self, rows: list[Sequence]) -> bool:
        slot_of = {id(seq): slot for slot, seq in enumerate(rows)}
        pairs = [
            (slot, slot_of[id(seq.companion)])
            for slot, seq in enumerate(rows)
            if seq.companion is not None and id(seq.companion) in slot_of
        ]
        self.pairs = None
        if pairs:
            guided, companion = zip(*pairs)
            scale = [rows[slot].params.guidance_scale for slot in guided]
            self.pairs = GuidancePairs(
                guided=torch.tensor(guided, device=self.device),
                companion=torch.tensor(companion, device=self.device),
                scale=torch.tensor(scale, dtype=torch.float32, device=self.device).unsqueeze(1),
            )
        return self.pairs is not None

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        pairs = self.pairs
        conditional = torch.log_softmax(scores[pairs.guided], dim=-1)
        unconditional = torch.log_softmax(scores[pairs.companion], dim=-1)
        guided = pairs.scale * (conditional - unconditional) + unconditional
        return scores.index_put((pairs.guided,), guided)


class RepetitionPenalty(PerRowValue):
    """Every token already in the sequence (prompt included) is penalised once; penalty 1.0 is the identity."""

    identity = 1.0

    def value(self, params: GenerationParameters) -> float:
        return params.repetition_penalty

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        num_rows = scores.shape[0]
        penalty = self.values[:num_rows].unsqueeze(1)
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(state.token_counts[:num_rows] > 0, penalised, scores)


class NoRepeatNgram(PerRowValue):
    """Ban each token that would complete an n-gram already present, for rows whose no_repeat_ngram_size is n."""

    dtype = torch.long
    sizes_in_use: tuple[int, ...] = ()  # the n-gram sizes some row bans

    def value(self, params: GenerationParameters) -> float:
        return params.no_repeat_ngram_size

    def refresh(self, rows: list[Sequence]) -> bool:
        self.sizes_in_use = tuple(sorted({seq.params.no_repeat_ngram_size for seq in rows} - {0}))
        return bool(self.sizes_in_use)

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        for ngram_size in self.sizes_in_use:
            if step.max_seq_length >= ngram_size:
                scores = self._ban(scores, state, ngram_size, step.max_seq_length)
        return scores

    def _ban(self, scores: torch.Tensor, state: BatchState, ngram_size: int, max_seq_length: int) -> torch.Tensor:
        num_rows = scores.shape[0]
        history = state.history[:num_rows, :max_seq_length]
        lengths = state.seq_length[:num_rows]
        windows = history.unfold(1, ngram_size, 1)  # [B, W, n]: every n-gram start
        prefix_len = ngram_size - 1
        prefix_positions = (lengths.unsqueeze(1) - prefix_len + torch.arange(prefix_len, device=scores.device)).clamp(
            min=0
        )
        current_prefix = history.gather(1, prefix_positions)  # the last n-1 tokens of each row
        matches = (windows[:, :, :prefix_len] == current_prefix.unsqueeze(1)).all(dim=2)
        starts = torch.arange(windows.shape[1], device=scores.device)
        inside = starts.unsqueeze(0) + ngram_size <= lengths.unsqueeze(1)
        applies = (self.values[:num_rows] == ngram_size).unsqueeze(1)
        hits = (matches & inside & applies).to(torch.int32)
        banned = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, windows[:, :, prefix_len], hits)
        return scores.masked_fill(banned > 0, NEG_INF)


@dataclass
class MultiTokenBans:
    """Banned sequences longer than one token, flattened across rows: ban `last_token` when `prefix` just occurred."""

    row: torch.Tensor  # [P] row index
    prefix: torch.Tensor  # [P, K] right-aligned, padded with -1
    prefix_length: torch.Tensor  # [P]
    last_token: torch.Tensor  # [P]


class BadWords(LogitsFeature):
    """HF's NoBadWordsLogitsProcessor: a banned single token is masked always (a mask by slot); the last token
    of a longer banned sequence when the tokens before it end the row (flattened across rows at refresh)."""

    applies_to_proposals = True  # rows that speculate ban single tokens only

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        super().__init__(max_rows, vocab_size, device)
        self.single = self._per_row(torch.bool, vocab_size)
        self.uses_single = False
        self.multi: MultiTokenBans | None = None

    @property
    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.single,)

    def add_row(self, slot: int, seq: Sequence) -> None:
        self.single[slot] = False
        self.single[slot, [words[0] for words in _bad_words(seq) if len(words) == 1]] = True

    def refresh(self, rows: list[Sequence]) -> bool:
        self.uses_single = any(len(words) == 1 for seq in rows for words in _bad_words(seq))
        self.multi = _multi_token_bans(rows, self.device)
        return self.uses_single or self.multi is not None

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        if self.uses_single:
            scores = scores.masked_fill(self.single[: scores.shape[0]], NEG_INF)
        if self.multi is not None:
            scores = self._ban_sequences(scores, state)
        return scores

    def apply_at_proposals(self, scores: torch.Tensor, state: BatchState) -> torch.Tensor:
        if not self.uses_single:
            return scores
        return scores.masked_fill(self.single[: scores.shape[0]].unsqueeze(1), NEG_INF)

    def _ban_sequences(self, scores: torch.Tensor, state: BatchState) -> torch.Tensor:
        bans = self.multi
        width = bans.prefix.shape[1]
        lengths = state.seq_length[bans.row]
        positions = (lengths.unsqueeze(1) - width + torch.arange(width, device=scores.device)).clamp(min=0)
        tails = state.history[bans.row].gather(1, positions)
        matches = ((tails == bans.prefix) | (bans.prefix < 0)).all(dim=1) & (lengths > bans.prefix_length)
        banned = torch.zeros_like(scores).index_put_(
            (bans.row, bans.last_token), matches.to(scores.dtype), accumulate=True
        )
        return scores.masked_fill(banned > 0, NEG_INF)


def _bad_words(seq: Sequence) -> list[tuple[int, ...]]:
    # HF's NoBadWordsLogitsProcessor drops a banned sequence that is just an eos token.
    eos = seq.params.eos_token_id
    return [b for b in seq.params.bad_words_ids if not (len(b) == 1 and b[0] in eos)]


def _multi_token_bans(rows: list[Sequence], device: torch.device) -> MultiTokenBans | None:
    entries = [(i, b) for i, seq in enumerate(rows) for b in _bad_words(seq) if len(b) > 1]
    if not entries:
        return None
    width = max(len(b) - 1 for _, b in entries)
    prefixes = [[-1] * (width - len(b) + 1) + list(b[:-1]) for _, b in entries]
    return MultiTokenBans(
        row=torch.tensor([i for i, _ in entries], device=device),
        prefix=torch.tensor(prefixes, dtype=torch.long, device=device),
        prefix_length=torch.tensor([len(b) - 1 for _, b in entries], device=device),
        last_token=torch.tensor([b[-1] for _, b in entries], device=device),
    )


class MinNewTokens(PerRowValue):
    """No eos token before the row has generated min_new_tokens."""

    dtype = torch.long

    def value(self, params: GenerationParameters) -> float:
        return params.min_new_tokens

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        num_rows = scores.shape[0]
        generated = state.seq_length[:num_rows] - state.prompt_length[:num_rows]
        too_early = (generated < self.values[:num_rows]).unsqueeze(1)
        return scores.masked_fill(too_early & state.eos_mask[:num_rows], NEG_INF)


class AllowedTokens(LogitsFeature):
    """allowed_token_ids: a row that sets them may pick only those (a mask by slot; all allowed otherwise)."""

    applies_to_proposals = True

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        super().__init__(max_rows, vocab_size, device)
        self.allowed = self._per_row(torch.bool, vocab_size)

    @property
    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.allowed,)

    def add_row(self, slot: int, seq: Sequence) -> None:
        allowed = seq.params.allowed_token_ids
        self.allowed[slot] = not allowed
        self.allowed[slot, list(allowed)] = True

    def refresh(self, rows: list[Sequence]) -> bool:
        return any(seq.params.allowed_token_ids for seq in rows)

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        return scores.masked_fill(~self.allowed[: scores.shape[0]], NEG_INF)

    def apply_at_proposals(self, scores: torch.Tensor, state: BatchState) -> torch.Tensor:
        return scores.masked_fill(~self.allowed[: scores.shape[0]].unsqueeze(1), NEG_INF)


class PresenceFrequencyPenalties(LogitsFeature):
    """OpenAI's penalties over the generated tokens (not the prompt): logit -= frequency * count + presence * seen."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        super().__init__(max_rows, vocab_size, device)
        self.presence = self._per_row(torch.float32)
        self.frequency = self._per_row(torch.float32)

    @property
    def slot_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.presence, self.frequency)

    def add_row(self, slot: int, seq: Sequence) -> None:
        self.presence[slot] = seq.params.presence_penalty
        self.frequency[slot] = seq.params.frequency_penalty

    def refresh(self, rows: list[Sequence]) -> bool:
        return any(seq.params.presence_penalty or seq.params.frequency_penalty for seq in rows)

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        num_rows = scores.shape[0]
        history = state.history[:num_rows, : step.max_seq_length]
        positions = torch.arange(step.max_seq_length, device=scores.device).unsqueeze(0)
        generated = (positions >= state.prompt_length[:num_rows].unsqueeze(1)) & (
            positions < state.seq_length[:num_rows].unsqueeze(1)
        )
        counts = torch.zeros_like(scores).scatter_add_(1, history, generated.to(scores.dtype))
        frequency = self.frequency[:num_rows].unsqueeze(1)
        presence = self.presence[:num_rows].unsqueeze(1)
        return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


class LogitBias(LogitsFeature):
    """OpenAI's logit_bias: every row's entries, flattened across rows at refresh, added to scores[row, token]."""

    applies_to_proposals = True
    entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, tokens, biases

    def refresh(self, rows: list[Sequence]) -> bool:
        entries = [(row, token, bias) for row, seq in enumerate(rows) for token, bias in seq.params.logit_bias]
        self.entries = None
        if entries:
            row, token, bias = zip(*entries)
            self.entries = (
                torch.tensor(row, device=self.device),
                torch.tensor(token, device=self.device),
                torch.tensor(bias, dtype=torch.float32, device=self.device),
            )
        return self.entries is not None

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        row, token, bias = self.entries
        return scores.index_put((row, token), bias, accumulate=True)

    def apply_at_proposals(self, scores: torch.Tensor, state: BatchState) -> torch.Tensor:
        row, token, bias = self.entries
        dense = torch.zeros(state.num_rows, scores.shape[2], device=scores.device)
        dense.index_put_((row, token), bias, accumulate=True)
        return scores + dense[: scores.shape[0]].unsqueeze(1)


class GrammarConstraint(LogitsFeature):
    """A constrained row (JSON schema, regex, grammar) may pick only what its llguidance matcher allows next."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        super().__init__(max_rows, vocab_size, device)
        self.bitmasks: TokenBitmasks | None = None  # allocated for the first constrained row
        self.rows: list[int] = []
        self.matchers: list = []

    def refresh(self, rows: list[Sequence]) -> bool:
        self.rows = [slot for slot, seq in enumerate(rows) if seq.grammar is not None]
        self.matchers = [rows[slot].grammar for slot in self.rows]
        if self.rows and self.bitmasks is None:
            self.bitmasks = TokenBitmasks(self.max_rows, self.vocab_size, self.device)
        return bool(self.rows)

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        return self.bitmasks.apply(scores, self.rows, self.matchers)


class CustomProcessors(LogitsFeature):
    """The server's registered processors a request enabled by name (plugins.py), run on that row alone; a
    processor that raises fails its request."""

    rows: list[Sequence] = []  # every slot's row (the processors run on the rows that have some)

    def refresh(self, rows: list[Sequence]) -> bool:
        self.rows = rows
        return any(seq.custom_processors for seq in rows)

    def apply(self, scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
        return apply_custom_processors(scores, self.rows, state.history, step.row_errors)


LOGITS_FEATURES: tuple[type[LogitsFeature], ...] = (
    ClassifierFreeGuidance,
    RepetitionPenalty,
    NoRepeatNgram,
    BadWords,
    MinNewTokens,
    AllowedTokens,
    PresenceFrequencyPenalties,
    LogitBias,
    GrammarConstraint,
    CustomProcessors,
)


def process_logits(scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
    """Every processor some row uses, in order, on the whole batch (greedy and sampling rows alike); `scores`
    is [B, V] float32."""
    for feature in state.active_features:
        scores = feature.apply(scores, state, step)
    return scores


def process_later_positions(scores: torch.Tensor, state: BatchState) -> torch.Tensor:
    """The processors of speculating rows at their proposed positions ([B, K, V]): only masks and biases apply
    to such rows, and they are the same at every position."""
    for feature in state.active_features:
        if feature.applies_to_proposals:
            scores = feature.apply_at_proposals(scores, state)
    return scores
