"""Custom processors, the service form of `generate(logits_processor=..., stopping_criteria=...)`.

HF-compatible `LogitsProcessor` / `StoppingCriteria` classes are registered at start-up under a name
(`--logits-processor NAME=module:Class`); a request enables one by name with JSON keyword arguments and gets
its own instance. They run only on the rows that enabled them, one row at a time (user code sees the
`(input_ids [1, L], scores [1, V])` it would see in `generate()`), and an exception in one fails that request
alone.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

import torch

from genserve.scheduler.core.params import ValidationError
from genserve.scheduler.core.request import Sequence


def load_class(spec: str) -> type:
    """Import "module:Class" and return the class."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"expected module:Class, got {spec!r}")
    return getattr(importlib.import_module(module_name), class_name)


def parse_registrations(specs: list[str]) -> dict[str, type]:
    """["NAME=module:Class", ...] to {NAME: class}."""
    registry = {}
    for spec in specs:
        name, _, target = spec.partition("=")
        if not name or not target:
            raise ValueError(f"expected NAME=module:Class, got {spec!r}")
        registry[name] = load_class(target)
    return registry


@dataclass(frozen=True)
class PluginRegistry:
    logits_processors: dict[str, type] = field(default_factory=dict)
    stopping_criteria: dict[str, type] = field(default_factory=dict)

    def instantiate(self, kind: str, enabled: tuple[tuple[str, str], ...]) -> tuple[object, ...]:
        """One fresh instance per (name, JSON kwargs) the request enabled; a clear error names what is wrong."""
        registry = self.logits_processors if kind == "logits_processors" else self.stopping_criteria
        instances = []
        for index, (name, json_args) in enumerate(enabled):
            field_name = f"{kind}[{index}]"
            if name not in registry:
                known = ", ".join(sorted(registry)) or "none are registered"
                raise ValidationError(field_name, f"unknown name {name!r} (known: {known})")
            try:
                kwargs = json.loads(json_args) if json_args else {}
                if not isinstance(kwargs, dict):
                    raise TypeError("the arguments must be a JSON object")
                instances.append(registry[name](**kwargs))
            except Exception as error:  # noqa: BLE001 - the user's class refusing its arguments is a bad request
                raise ValidationError(field_name, f"{name}: {type(error).__name__}: {error}") from None
        return tuple(instances)


def _row_input_ids(history: torch.Tensor, row: int, seq: Sequence, extra: int = 0) -> torch.Tensor:
    return history[row : row + 1, : seq.num_tokens + extra]


def apply_custom_processors(
    scores: torch.Tensor, rows: list[Sequence], history: torch.Tensor, failures: dict[int, str]
) -> torch.Tensor:
    """Run each row's own processors on that row; a row whose processor raises is recorded in `failures`."""
    for row, seq in enumerate(rows):
        if not seq.custom_processors or row in failures:
            continue
        try:
            row_scores = scores[row : row + 1]
            for processor in seq.custom_processors:
                row_scores = processor(_row_input_ids(history, row, seq), row_scores)
            scores[row] = row_scores[0]
        except Exception as error:  # noqa: BLE001 - user code: fail this request, not the batch
            failures[row] = f"logits processor failed: {type(error).__name__}: {error}"
    return scores


def custom_stop_hits(
    scores: torch.Tensor, rows: list[Sequence], history: torch.Tensor, failures: dict[int, str]
) -> torch.Tensor:
    """[B] bool: rows whose stopping criteria say stop, after this step's token is in `history`."""
    hits = torch.zeros(len(rows), dtype=torch.bool, device=scores.device)
    for row, seq in enumerate(rows):
        if not seq.custom_criteria or row in failures:
            continue
        try:
            input_ids = _row_input_ids(history, row, seq, extra=1)
            for criterion in seq.custom_criteria:
                # Stays on the device: the stop joins the step's single host copy.
                hits[row] |= torch.as_tensor(criterion(input_ids, scores[row : row + 1])[0], device=hits.device)
        except Exception as error:  # noqa: BLE001
            failures[row] = f"stopping criteria failed: {type(error).__name__}: {error}"
    return hits
