"""`generate()`'s own logits processors, batched over rows that each carry their own values: classifier-free
guidance, repetition penalty, no-repeat n-gram, bad words, min_new_tokens and allowed token ids
(`prefix_allowed_tokens_fn`'s service form). Each matches its HF counterpart's semantics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import Sequence

if TYPE_CHECKING:
    from genserve.scheduler.features.batch_state import BatchState

from genserve.scheduler.features.logits_feature import NEG_INF, LogitsFeature, LogitsStep, PerRowValue


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
