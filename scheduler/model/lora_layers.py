"""Per-row LoRA inside the model's forward pass: each adapted projection adds its row's `scale·(x·A)·B`.

Every projection an adapter may adapt is wrapped once (`install_lora_layers`) in a `LoraProjection`, whatever
computes it underneath (nn.Linear, or cpu_linear's prepacked and fused oneDNN layers). A pass names each row's
adapter slot (`adapter_rows`). The slots' factors lie side by side (lora_slots.py): all rows multiply with every
slot's A in one GEMM, each row keeps its own slot's columns (a one-hot select; the others become exact zeros), and
one GEMM with every slot's B gives each row its own delta. That is two GEMMs per projection whatever the mix, no
loop over rows or adapters, no gathered copies of factors, and never a merge into the base weights; the extra
work is L·R columns (L slots of rank R) against the projection's own. The base model's rows select nothing and add
exact zeros. A pass whose rows all use one slot multiplies with that adapter's factors alone, and a pass of the
base model alone skips the adapters altogether.

PEFT (LoraLayer.forward) computes `result + lora_B(lora_A(x)) * scaling`; here the scaling is folded into B once,
when an adapter enters its slot, and the second GEMM adds into the base's result (addmm): `result + (x·A)·(s·B)`,
the same sum rounded in other places (README: LoRA adapters, what is exact). Per projection that is one GEMM and
one addmm, the first shared by sibling projections: the ops, not their arithmetic, are what a small batch pays for.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SlotFactors:
    """One projection's factors for every adapter slot, side by side: slot s (1..L) owns the R columns of `down`
    and the R rows of `up` at (s - 1) * R, zeros past its adapter's rank. Slot 0, the base model, owns none."""

    down: torch.Tensor  # [in_features, L * R]: each slot's A^T
    up: torch.Tensor  # [L * R, out_features]: each slot's B^T times its adapter's scaling for this projection
    # Sibling projections that read the same input (q/k/v, gate/up): their `down`s are column blocks of this one
    # tensor, multiplied once for all of them; `sibling` is this projection's block.
    siblings_down: torch.Tensor | None = None
    sibling: int = 0


@dataclass(frozen=True)
class AdapterRows:
    """The adapter slot of each row of one forward pass ([rows, tokens, features] inputs)."""

    slots: torch.Tensor  # [rows], long
    select: torch.Tensor  # [rows, 1, L, 1]: 1 at each row's slot (none for the base model's rows), else 0
    factors: dict[str, SlotFactors]  # module path -> its slots
    only_slot: int | None = None  # every row uses this slot: its factors alone (None: rows differ, or captured)
    only_rank: int = 0  # that slot's adapter rank


class _Active(threading.local):
    """The pass under way, per thread: engines that share one model run their passes in threads of their own.
    Sibling projections share one x·A: the first called on an input computes every sibling's (selected), the
    others, called on that same tensor, take their block; any other input is computed anew. The share lives as
    long as the rows it was computed for."""

    rows: AdapterRows | None = None
    sibling_key: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, siblings_down) of `sibling_hidden`
    sibling_hidden: torch.Tensor | None = None

    def siblings(self, inputs: torch.Tensor, siblings_down: torch.Tensor, max_rank: int) -> torch.Tensor:
        key = self.sibling_key
        if key is None or key[0] is not inputs or key[1] is not siblings_down:
            self.sibling_key = (inputs, siblings_down)
            self.sibling_hidden = _selected(inputs @ siblings_down, self.rows, max_rank)
        return self.sibling_hidden


_ACTIVE = _Active()


@contextmanager
def adapter_rows(rows: AdapterRows | None) -> Iterator[None]:
    """Run the forward passes inside with these rows' adapters (None: the base model for every row)."""
    previous, _ACTIVE.rows = _ACTIVE.rows, rows
    _ACTIVE.sibling_key = _ACTIVE.sibling_hidden = None
    try:
        yield
    finally:
        _ACTIVE.rows = previous
        _ACTIVE.sibling_key = _ACTIVE.sibling_hidden = None


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
        num_slots = rows.select.shape[2]
        max_rank = factors.up.shape[0] // num_slots
        if rows.only_slot is not None:
            start = (rows.only_slot - 1) * max_rank
            down = factors.down[:, start : start + rows.only_rank]
            return _add_product(result, inputs @ down, factors.up[start : start + rows.only_rank])
        if inputs.dim() != 3 or inputs.shape[0] != rows.slots.shape[0]:
            raise RuntimeError(
                f"{self.path}: per-row adapters need [rows, tokens, features] inputs with "
                f"{rows.slots.shape[0]} rows, got {tuple(inputs.shape)}"
            )
        # Every slot's x·A at once (one GEMM, shared by siblings), each row keeping its own slot's part (the others
        # become exact zeros), then one GEMM with every slot's B.
        width = num_slots * max_rank
        if factors.siblings_down is None:
            hidden = _selected(inputs @ factors.down, rows, max_rank)
        else:
            hidden = _ACTIVE.siblings(inputs, factors.siblings_down, max_rank)
            hidden = hidden[..., factors.sibling * width : (factors.sibling + 1) * width]
        return _add_product(result, hidden, factors.up)


def _add_product(result: torch.Tensor, hidden: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`result + hidden @ up` as one addmm over the rows and tokens flattened."""
    sums = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up)
    return sums.view(result.shape)


def _selected(hidden: torch.Tensor, rows: AdapterRows, max_rank: int) -> torch.Tensor:
    """`hidden` ([rows, tokens, n * L * R]: n projections' blocks of L slots) with every row's columns outside its
    own slot zeroed."""
    num_slots = rows.select.shape[2]
    blocks = hidden.unflatten(-1, (-1, num_slots, max_rank))  # [rows, tokens, n, L, R]
    return (blocks * rows.select.unsqueeze(2)).flatten(-3)


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
