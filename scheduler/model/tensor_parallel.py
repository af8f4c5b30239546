"""Tensor parallelism: the ranks' process group, and each rank's shard of the model through transformers' own plan.

Every rank is a process of its own on this host. They join one `torch.distributed` group (NCCL on CUDA, one GPU per
rank; gloo on CPU). Each rank loads the model with `DistributedConfig(tp_size=N)`: transformers applies the plan
the model's config carries (`base_model_tp_plan`: q/k/v and gate/up split by output columns, o/down by input rows
and summed across ranks, the vocabulary head gathered), so every rank holds about 1/N of the weights and its own
attention heads. The engine's KV caches learn their shapes from a probe pass, so each rank's cache holds its own
KV heads. Collectives and sharding are PyTorch's and transformers', never our own.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import PretrainedConfig, PreTrainedModel
from transformers.distributed import DistributedConfig

from genserve.scheduler.core.errors import UnsupportedModelError

log = logging.getLogger(__name__)

# Collectives wait this long before they fail (the loading ranks may read their shards at different speeds). A
# hung step is caught sooner, by the leader's watchdog (EngineConfig.step_timeout), which ends every rank.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def join_ranks(rank: int, world_size: int, port: int, device: torch.device) -> None:
    """Join the group of `world_size` ranks that the leader (rank 0) opens on 127.0.0.1:`port`."""
    # transformers reads the launcher's usual variables when it builds its device mesh.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        backend = "nccl"
    else:
        _take_cores(rank, world_size)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    log.info("rank %d of %d joined the %s group", rank, world_size, backend)


def _take_cores(rank: int, world_size: int) -> None:
    """On CPU, this rank's own share of the host's cores: its threads pinned to them and torch's thread count
    set to match, as vLLM's CPU workers bind theirs. N ranks that each ran one thread per core would
    oversubscribe the host N times over, and every collective would wait on the slowest, descheduled thread."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < world_size:
        log.warning("%d ranks share %d cores: their threads are not pinned", world_size, len(cores))
        return
    share = len(cores) // world_size
    own = cores[rank * share : (rank + 1) * share]
    os.sched_setaffinity(0, own)  # threads started from here on (the engine's among them) inherit it
    torch.set_num_threads(len(own))
    log.info("rank %d of %d runs on cores %s", rank, world_size, own)


def check_shardable(config: PretrainedConfig, world_size: int) -> None:
    """Refuse, before any weight is read, a model without a tensor-parallel plan or whose heads do not split."""
    text = config.get_text_config()
    name = (config.architectures or [type(config).__name__])[0]
    if not getattr(text, "base_model_tp_plan", None):
        raise UnsupportedModelError(
            f"{name}: its config carries no tensor-parallel plan (base_model_tp_plan); serve it with "
            "--tensor-parallel-size 1"
        )
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, field, None)
        if heads is not None and heads % world_size:
            raise UnsupportedModelError(
                f"{name}: {field} = {heads} does not split over --tensor-parallel-size {world_size}"
            )


def distributed_config(config: PretrainedConfig, world_size: int) -> DistributedConfig:
    """The dense layers split by the tensor-parallel plan; a mixture of experts' experts (the config's expert-
    parallel plan) split between the same ranks, each running its own experts and the outputs summed."""
    experts = world_size if getattr(config.get_text_config(), "base_model_ep_plan", None) else None
    return DistributedConfig(tp_size=world_size, ep_size=experts)


def sharded_load_options(config: PretrainedConfig, world_size: int) -> dict[str, object]:
    """`from_pretrained` options that make each rank read and keep only its shard."""
    return {"distributed_config": distributed_config(config, world_size)}


def shard_in_place(model: PreTrainedModel, world_size: int) -> PreTrainedModel:
    """A model built whole (random weights) cut down to this rank's shard by the same plans. Tied weights (an
    output head that is the input embedding) are cut as two parameters, as `from_pretrained` cuts them before it
    ties them, then tied again: both plans split the vocabulary the same way."""
    tied = model.all_tied_weights_keys
    for head in tied:
        owner, _, name = head.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, name, torch.nn.Parameter(getattr(module, name).detach(), requires_grad=False))
    config, _, mesh = model.prepare_distribute_model(distributed_config(model.config, world_size))
    model = model.maybe_distribute_model(model, config, mesh)
    if tied:
        model.tie_weights(recompute_mapping=False)
    return model


def log_shard(model: PreTrainedModel) -> PreTrainedModel:
    """Log what this rank holds (the README's per-rank memory figures come from these lines)."""
    held = rank_parameter_bytes(model)
    rank, size = dist.get_rank(), dist.get_world_size()
    log.info("tensor-parallel rank %d of %d holds %d bytes of parameters (%.1f MiB)", rank, size, held, held / 2**20)
    return model


def rank_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds (a sharded parameter counts its local part)."""
    total = 0
    for parameter in model.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total
