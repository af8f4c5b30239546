"""The plain models that `generate()` references run on.

An engine packs the model it serves in place (one copy of the weights: `scheduler/model/cpu_linear.py`), so
`generate()` on that model afterwards would run the engine's own kernels. The reference is a plain copy of the
model, taken before any engine sees it. This registry lives in a module of its own because pytest imports
conftest.py twice (as pytest's conftest and as `tests.conftest`), and both must see the same copies.
"""

from __future__ import annotations

import copy
import weakref

import torch

from genserve.scheduler.model.cpu_linear import is_prepacked

_PLAIN_REFERENCES: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def with_plain_reference(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, with a plain copy of it kept as its reference."""
    _PLAIN_REFERENCES[model] = copy.deepcopy(model)
    return model


def plain_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The plain copy kept for `model`, or `model` itself while no engine has packed it."""
    reference = _PLAIN_REFERENCES.get(model, model)
    assert not is_prepacked(reference), "an engine packed this model: keep with_plain_reference(model) before that"
    return reference
