"""The base of every per-row logits processor: `LogitsFeature` (its state by slot, `add_row`, `refresh`, `apply`)
and `PerRowValue` for the processors whose state is one value per row. The processors themselves are in
generate_processors.py and request_processors.py; their order in logits_processing.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import Sequence

if TYPE_CHECKING:
    from genserve.scheduler.features.batch_state import BatchState


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
