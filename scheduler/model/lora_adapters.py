"""Reading a PEFT LoRA adapter for the served model, and refusing what the engine cannot serve exactly.

PEFT reads the folder (`PeftConfig.from_pretrained`, `load_peft_weights`); this module only checks what PEFT read
against the served model and keeps, per target projection, the two factors in the layout the batched delta
multiplies with (lora_slots.py, lora_layers.py): `down` = A^T [in, r], `up` = B^T [r, out], and PEFT's scaling
(lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; rank_pattern and alpha_pattern resolved per module as
PEFT resolves them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from genserve.scheduler.core.errors import AdapterError
from genserve.scheduler.model.lora_layers import LoraProjection

# PEFT saves the factors under the wrapped model's names: base_model.model.<module path>.lora_A.weight.
_SAVED_PREFIX = "base_model.model."
_FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# LoraConfig switches that make PEFT compute something other than x·W + scale·(x·A)·B at inference; an adapter
# that sets any of them is refused rather than served inexactly. (Initialisation methods such as LoftQ, EVA or
# CorDA leave plain factors and are served.)
_VARIANTS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "lora_bias": "a LoRA bias term",
    "modules_to_save": "full copies of modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "fan_in_fan_out": "Conv1D-style (fan_in_fan_out) weights",
}


@dataclass(frozen=True)
class LoraFactors:
    down: torch.Tensor  # A^T: [in_features, rank]
    up: torch.Tensor  # B^T: [rank, out_features]
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[1]


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    path: Path
    modules: dict[str, LoraFactors]  # module path in the served model -> its factors

    @property
    def rank(self) -> int:
        return max(factors.rank for factors in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.modules.values())


def read_adapter(
    name: str,
    path: Path,
    model: torch.nn.Module,
    targets: dict[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LoraAdapter:
    """The adapter in folder `path`, read by PEFT and checked against `model` (whose adaptable projections are
    `targets`); AdapterError says which check failed and why."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_config.json (a PEFT adapter folder)")
    try:
        config = PeftConfig.from_pretrained(str(path))
        saved = load_peft_weights(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - a corrupt or unreadable adapter is this adapter's failure only
        raise AdapterError(f"adapter {name!r}: PEFT cannot read {path}: {type(error).__name__}: {error}") from error
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r} is a {peft_type} adapter; only LoRA adapters are served")
    for flag, what in _VARIANTS.items():
        if getattr(config, flag, None):
            raise AdapterError(f"adapter {name!r} uses {what}, which is not served (plain LoRA only)")
    if getattr(config, "bias", "none") != "none":
        raise AdapterError(f"adapter {name!r} trains biases (bias={config.bias!r}), which is not served")
    _check_targets(name, config, model, targets)
    factors = _factors_by_module(name, saved, model, targets)
    modules = {}
    for module, (a, b) in factors.items():
        rank = a.shape[0]
        if rank > max_rank:
            raise AdapterError(
                f"adapter {name!r} has rank {rank} at {module}; the server's --max-lora-rank is {max_rank}"
            )
        in_features, out_features = targets[module]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterError(
                f"adapter {name!r} was made for another base model: its factors for {module} are "
                f"{tuple(a.shape)} and {tuple(b.shape)}, the served projection is {in_features} -> {out_features} "
                f"(its base: {config.base_model_name_or_path or 'not recorded'})"
            )
        modules[module] = LoraFactors(
            down=a.t().to(device=device, dtype=dtype).contiguous(),
            up=b.t().to(device=device, dtype=dtype).contiguous(),
            scaling=_scaling(config, module, rank),
        )
    if not modules:
        raise AdapterError(f"adapter {name!r} at {path} holds no LoRA weights")
    return LoraAdapter(name, path, modules)


def _check_targets(name: str, config: object, model: torch.nn.Module, targets: dict[str, tuple[int, int]]) -> None:
    """Every module that the adapter's target_modules match (by PEFT's own matching) is one served with LoRA."""
    from peft.tuners.tuners_utils import check_target_module_exists

    inner = {id(module.base) for module in model.modules() if isinstance(module, LoraProjection)}
    for path, module in model.named_modules():
        if path and path not in targets and id(module) not in inner and check_target_module_exists(config, path):
            raise AdapterError(f"adapter {name!r} targets {path}: {_why_not_a_target(path, model)}")


def _factors_by_module(
    name: str, saved: dict[str, torch.Tensor], model: torch.nn.Module, targets: dict[str, tuple[int, int]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The saved state dict as module path -> (A, B), every key accounted for."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is None or not key.startswith(_SAVED_PREFIX):
            raise AdapterError(f"adapter {name!r} holds {key!r}, which is not a LoRA factor of a linear projection")
        module = key[len(_SAVED_PREFIX) : -len(suffix)]
        if module not in targets:
            raise AdapterError(f"adapter {name!r} targets {module}: {_why_not_a_target(module, model)}")
        pairs.setdefault(module, {})[_FACTORS[suffix]] = tensor
    incomplete = [module for module, pair in pairs.items() if len(pair) != 2]
    if incomplete:
        raise AdapterError(f"adapter {name!r} has only one of lora_A and lora_B for {incomplete[0]}")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def _why_not_a_target(module: str, model: torch.nn.Module) -> str:
    found = dict(model.named_modules()).get(module)
    if found is None:
        return "the served model has no such module (an adapter made for another base model)"
    if found is model.get_output_embeddings():
        return "LoRA on the output head (lm_head) is not served; adapt the decoder's projections"
    if found is model.get_input_embeddings():
        return "LoRA on the input embeddings is not served; adapt the decoder's projections"
    return f"it is a {type(found).__name__}; LoRA is served on linear projections only"


def _scaling(config: object, module: str, rank: int) -> float:
    """PEFT's scaling for `module` (LoraModel._create_and_replace and LoraLayer.update_layer)."""
    from peft.utils.other import get_pattern_key

    alpha_key = get_pattern_key(config.alpha_pattern.keys(), module)
    alpha = config.alpha_pattern.get(alpha_key, config.lora_alpha)
    return alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
