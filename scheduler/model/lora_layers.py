"""Per-row LoRA inside the model's forward pass: each adapted projection adds its row's `scale·(x·A)·B`.

Every projection an adapter may adapt is wrapped once (`install_lora_layers`) in a `LoraProjection`, whatever
computes it underneath (nn.Linear, or cpu_linear's prepacked and fused oneDNN layers). A pass names each row's
adapter slot (`adapter_rows`); the wrapper gathers the rows' factors from the stacked slots (lora_slots.py) and
multiplies all rows at once with two batched matmuls: Punica's and vLLM's gather-then-BGMV, not a loop over rows
or adapters, and never a merge into the base weights. Slot 0 holds zeros (the base model): its rows add exact
zeros. A pass whose rows all use one slot multiplies with that adapter's factors directly, and a pass of the base
model alone skips the adapters altogether.

The arithmetic is PEFT's (LoraLayer.forward): `result + lora_B(lora_A(x)) * scaling`, in the model's dtype.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotFactors:
    """One projection's factors in every adapter slot (zeros past each adapter's rank, and in slot 0)."""

    down: torch.Tensor  # [slots, in_features, max rank]: A^T
    up: torch.Tensor  # [slots, max rank, out_features]: B^T
    scaling: torch.Tensor  # [slots]
    scalings: list[float]  # the same, on the host (a pass of one adapter multiplies by it, as PEFT does)


@dataclass(frozen=True)
class AdapterRows:
    """The adapter slot of each row of one forward pass ([rows, ...] inputs)."""

    slots: torch.Tensor  # [rows], long
    factors: dict[str, SlotFactors]  # module path -> its slots
    only_slot: int | None = None  # every row uses this slot: no gather (None: rows differ, or a captured pass)
    only_rank: int = 0  # that slot's adapter rank


class _Active(threading.local):
    """The pass under way, per thread: engines that share one model run their passes in threads of their own."""

    rows: AdapterRows | None = None


_ACTIVE = _Active()


@contextmanager
def adapter_rows(rows: AdapterRows | None) -> Iterator[None]:
    """Run the forward passes inside with these rows' adapters (None: the base model for every row)."""
    previous, _ACTIVE.rows = _ACTIVE.rows, rows
    try:
        yield
    finally:
        _ACTIVE.rows = previous


class LoraProjection(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, path: str) -> None:
        super().__init__()
        self.base = base
        self.path = path
        self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (or its stand-in), for code that reads its shape or dtype."""
        return self.base.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        result = self.base(inputs)
        rows = _ACTIVE.rows
        if rows is None or rows.only_slot == 0:
            return result
        factors = rows.factors[self.path]
        if rows.only_slot is not None:
            slot, rank = rows.only_slot, rows.only_rank
            down, up = factors.down[slot, :, :rank], factors.up[slot, :rank]
            return result + (inputs @ down) @ up * factors.scalings[slot]
        if inputs.dim() != 3 or inputs.shape[0] != rows.slots.shape[0]:
            raise RuntimeError(
                f"{self.path}: per-row adapters need [rows, tokens, features] inputs with "
                f"{rows.slots.shape[0]} rows, got {tuple(inputs.shape)}"
            )
        slots = rows.slots
        delta = torch.bmm(torch.bmm(inputs, factors.down[slots]), factors.up[slots])
        return result + delta * factors.scaling[slots].view(-1, 1, 1)


def lora_targets(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The projections an adapter may adapt, module path -> (in_features, out_features): every linear layer of
    the model but its output head (what LoraProjection wraps, once)."""
    head = model.get_output_embeddings()
    wrapped = {id(module.base) for module in model.modules() if isinstance(module, LoraProjection)}
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if module is not head
        and id(module) not in wrapped
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    }


def install_lora_layers(model: torch.nn.Module, targets: dict[str, tuple[int, int]]) -> None:
    """Wrap each target projection of `model` in a LoraProjection (those wrapped already stay as they are)."""
    for path in targets:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        module = parent._modules[name]
        if not isinstance(module, LoraProjection):
            parent._modules[name] = LoraProjection(module, path)
