"""The device's adapter slots: every adaptable projection's LoRA factors, stacked for `max_loras` adapters.

Slot 0 is the base model (it holds nothing); slots 1..max_loras hold the adapters that rows use, side by side,
padded with zeros to `max_lora_rank` (lora_layers.SlotFactors). The tensors are allocated once, so their
addresses never change (a captured decode pass keeps pointing at them). An adapter enters a slot when one of its
requests takes a row (`activate`), evicting the least recently used adapter that no row uses; the scheduler keeps
the adapters of a step within the slots (scheduler.py), so one is always free. vLLM's LoRA manager keeps the same
two tiers: the adapters read into host memory (the engine's registry), and those placed in the device's slots
(these).
"""

from __future__ import annotations

import itertools

import torch

from genserve.scheduler.model.cpu_linear import SIBLING_PROJECTIONS
from genserve.scheduler.model.lora_adapters import LoraAdapter
from genserve.scheduler.model.lora_layers import AdapterRows, SlotFactors


class LoraSlots:
    def __init__(
        self,
        targets: dict[str, tuple[int, int]],
        max_loras: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """`targets`: the adaptable projections, module path -> (in_features, out_features)."""
        self.targets = targets
        self.device = device
        self.dtype = dtype
        self.max_loras, self.max_rank = max_loras, max_rank
        num_slots = max_loras + 1
        width = max_loras * max_rank
        downs = {}  # siblings' `down`s are column blocks of one tensor: one GEMM for all of them
        for group in sibling_groups(targets):
            shared = torch.zeros(targets[group[0]][0], len(group) * width, dtype=dtype, device=device)
            downs.update((path, (shared, index)) for index, path in enumerate(group))
        self.factors = {}
        for path, (in_features, out_features) in targets.items():
            shared, index = downs.get(path, (None, 0))
            if shared is not None:
                down = shared[:, index * width : (index + 1) * width]
            else:
                down = torch.zeros(in_features, width, dtype=dtype, device=device)
            self.factors[path] = SlotFactors(
                down=down,
                up=torch.zeros(width, out_features, dtype=dtype, device=device),
                siblings_down=shared,
                sibling=index,
            )
        self.holders: list[str] = [""] * num_slots  # adapter name per slot ("": empty; slot 0: the base model)
        self.ranks = [0] * num_slots
        self._last_used = [0] * num_slots
        self._clock = itertools.count(1)

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.factors.values())

    def slot_of(self, adapter: str) -> int:
        """The slot holding `adapter` (0 for the base model, ""); KeyError if it holds none."""
        return 0 if not adapter else self.holders.index(adapter, 1)

    def activate(self, adapter: LoraAdapter, busy: set[str]) -> int:
        """Place `adapter` in a slot, unless one holds it already, evicting the least recently used adapter not
        in `busy` (the adapters of the rows); its slot."""
        if adapter.name in self.holders[1:]:
            slot = self.slot_of(adapter.name)
        else:
            busy = busy - {""}
            free = [slot for slot in range(1, len(self.holders)) if self.holders[slot] not in busy]
            if not free:
                raise RuntimeError(f"no free adapter slot for {adapter.name!r}: rows use {sorted(busy)}")
            slot = min(free, key=lambda candidate: self._last_used[candidate])
            self._write(slot, adapter)
        self._last_used[slot] = next(self._clock)
        return slot

    def evict(self, adapter: str) -> None:
        """Forget `adapter` (unloaded): its slot, if any, becomes empty."""
        if adapter in self.holders[1:]:
            slot = self.slot_of(adapter)
            self.holders[slot], self.ranks[slot], self._last_used[slot] = "", 0, 0

    def rows(self, adapters: list[str]) -> AdapterRows | None:
        """The slots of a pass whose rows use these adapters, in row order; None when every row is the base
        model's."""
        slots = [self.slot_of(adapter) for adapter in adapters]
        if not any(slots):
            return None
        only = slots[0] if all(slot == slots[0] for slot in slots) else None
        rows = self.static_rows(len(slots))
        self.write_rows(rows, adapters)
        return AdapterRows(
            slots=rows.slots,
            select=rows.select,
            factors=self.factors,
            only_slot=only,
            only_rank=self.ranks[only] if only is not None else 0,
        )

    def static_rows(self, num_rows: int) -> AdapterRows:
        """Buffers for `num_rows` rows, every row on the base model until `write_rows` says otherwise (a captured
        pass keeps pointing at them)."""
        return AdapterRows(
            slots=torch.zeros(num_rows, dtype=torch.long, device=self.device),
            select=torch.zeros(num_rows, 1, self.max_loras, 1, dtype=self.dtype, device=self.device),
            factors=self.factors,
        )

    def write_rows(self, rows: AdapterRows, adapters: list[str]) -> None:
        """The first rows of `rows` on these adapters, the rest on the base model, in place."""
        slots = torch.tensor([self.slot_of(adapter) for adapter in adapters], dtype=torch.long)
        rows.slots.zero_()
        rows.slots[: len(adapters)] = slots.to(self.device)
        select = torch.nn.functional.one_hot(rows.slots, self.max_loras + 1)[:, 1:]
        rows.select.copy_(select.view(rows.select.shape))

    def _write(self, slot: int, adapter: LoraAdapter) -> None:
        start = (slot - 1) * self.max_rank
        columns = slice(start, start + self.max_rank)
        for path, stacked in self.factors.items():
            stacked.down[:, columns].zero_()
            stacked.up[columns].zero_()
            factors = adapter.modules.get(path)
            if factors is not None:
                stacked.down[:, start : start + factors.rank] = factors.down
                stacked.up[start : start + factors.rank] = factors.up * factors.scaling
        self.holders[slot], self.ranks[slot] = adapter.name, adapter.rank


def sibling_groups(targets: dict[str, tuple[int, int]]) -> list[list[str]]:
    """Targets that HF decoders call on one input (SIBLING_PROJECTIONS under one parent), with one input width."""
    groups = []
    for parent in sorted({path.rpartition(".")[0] for path in targets}):
        for names in SIBLING_PROJECTIONS:
            group = [f"{parent}.{name}" for name in names]
            if all(path in targets for path in group) and len({targets[path][0] for path in group}) == 1:
                groups.append(group)
    return groups
