"""The processors past `generate()`'s, applied after them so that unset they change nothing: OpenAI-style presence
and frequency penalties, logit_bias, a constrained row's grammar mask, and the request's custom processors."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from genserve.scheduler.core.request import Sequence
from genserve.scheduler.features.constraints import TokenBitmasks
from genserve.scheduler.features.plugins import apply_custom_processors

if TYPE_CHECKING:
    from genserve.scheduler.features.batch_state import BatchState

from genserve.scheduler.features.logits_feature import LogitsFeature, LogitsStep


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
