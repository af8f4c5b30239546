"""The engine of genserve (`genserve.scheduler`), free of gRPC and HTTP, and its public face.

The front ends (`genserve.service`) import only the names below, from this package: an import-linter contract in
pyproject.toml keeps them out of the rooms (`core`, `kv`, `features`, `model`, `engine`). Importing this
package loads no torch: the names that need it (the engines, model loading, plugins) are imported on first use,
so the client commands (`genserve generate`, `chat`, `loadtest`) start without it.

- Requests: `GenerationParameters` (every generate() knob, validated), `RequestOptions`, `Priority`,
  `Constraint`, and the outputs' `FinishReason`, `TokenLogprob`, `GenerationOutput`.
- The engine: `EngineConfig`, `Engine` (the loop), `AsyncEngine` (the one object a server holds),
  `ModelDescription`, `EngineSnapshot`, `LoadReport`, `StepStats`.
- Errors a request can meet: `ValidationError` (names the field), `QueueFullError`, `DeadlineUnreachableError`,
  `RequestFailedError`, `UnknownAdapterError` (a LoRA adapter not loaded), `AdapterError` (one that cannot be
  served), `EngineDeadError` (a tensor-parallel rank died or hung); at start-up `UnsupportedModelError`.
- Start-up: `load_model`, `model_folder`, `LoadedModel`, `DEFAULT_MODEL`, `default_gguf_path`, `resolve_device`,
  `PluginRegistry`, `parse_registrations`, `in_passing_thread`, `resolve_linear_kernel`, `onednn_applies`.
- Tensor parallelism: `join_ranks`, `Lockstep` (a rank's place in its group), `RankWatch` (the leader's watch
  over its followers and steps), `rank_parameter_bytes`.
"""

from __future__ import annotations

import importlib

from genserve.scheduler.core.config import DECODE_MODES, LINEAR_KERNELS, EngineConfig
from genserve.scheduler.core.errors import AdapterError, EngineDeadError, UnknownAdapterError, UnsupportedModelError
from genserve.scheduler.core.params import GenerationParameters, ValidationError
from genserve.scheduler.core.request import Constraint, FinishReason, Priority, RequestOptions, TokenLogprob
from genserve.scheduler.core.snapshot import EngineSnapshot, LoadReport, ModelDescription, StepStats
from genserve.scheduler.core.waiting_queue import QueueFullError

# Names whose modules import torch, loaded on first use (PEP 562): name -> module.
_ON_FIRST_USE = {
    "Engine": "genserve.scheduler.engine.loop",
    "DeadlineUnreachableError": "genserve.scheduler.engine.submission",
    "AsyncEngine": "genserve.scheduler.engine.async_engine",
    "GenerationOutput": "genserve.scheduler.engine.async_engine",
    "RequestFailedError": "genserve.scheduler.engine.async_engine",
    "load_model": "genserve.scheduler.model.loader",
    "model_folder": "genserve.scheduler.model.loader",
    "LoadedModel": "genserve.scheduler.model.loader",
    "DEFAULT_MODEL": "genserve.scheduler.model.loader",
    "default_gguf_path": "genserve.scheduler.model.loader",
    "resolve_device": "genserve.scheduler.model.loader",
    "PluginRegistry": "genserve.scheduler.features.plugins",
    "parse_registrations": "genserve.scheduler.features.plugins",
    "in_passing_thread": "genserve.scheduler.model.cpu_threads",
    "Lockstep": "genserve.scheduler.engine.lockstep",
    "RankWatch": "genserve.scheduler.engine.lockstep",
    "join_ranks": "genserve.scheduler.model.tensor_parallel",
    "rank_parameter_bytes": "genserve.scheduler.model.tensor_parallel",
    "resolve_linear_kernel": "genserve.scheduler.model.cpu_linear",
    "onednn_applies": "genserve.scheduler.model.cpu_linear",
}

__all__ = [
    "DECODE_MODES",
    "LINEAR_KERNELS",
    "Constraint",
    "EngineConfig",
    "EngineSnapshot",
    "FinishReason",
    "GenerationParameters",
    "LoadReport",
    "ModelDescription",
    "Priority",
    "QueueFullError",
    "RequestOptions",
    "StepStats",
    "TokenLogprob",
    "UnsupportedModelError",
    "UnknownAdapterError",
    "AdapterError",
    "EngineDeadError",
    "ValidationError",
    *_ON_FIRST_USE,
]


def __getattr__(name: str) -> object:
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    globals()[name] = value
    return value
