"""The flags several `genserve` commands share (model, engine, features), each defaulting to a GENSERVE_* variable,
and how they become an EngineConfig, a loaded model and an engine."""

from __future__ import annotations

import argparse
import os
import re

from genserve.scheduler import LINEAR_KERNELS, EngineConfig


def env_default(name: str, default: str) -> str:
    """Flags default to GENSERVE_* environment variables, so a container is configured without a command line."""
    return os.environ.get(f"GENSERVE_{name.upper()}", default)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=env_default("model", "default"),
        help="'default' (SmolLM2-135M-Instruct, bundled), a local Hugging Face model folder, or a .gguf file",
    )
    group.add_argument(
        "--dtype",
        default=env_default("dtype", "auto"),
        help="auto (fp32 on CPU, bf16 on CUDA), float32, float16, bfloat16",
    )
    group.add_argument(
        "--device", default=env_default("device", "auto"), help="auto (CUDA when present), cpu, cuda, cuda:N"
    )
    group.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        default=env_default("no_cuda_graphs", "") == "1",
        help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured per batch-size bucket",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        default=env_default("compile", "") == "1",
        help="on CPU, run decode steps through torch.compile (inductor), traced once at start-up before health "
        "turns SERVING (one to two minutes for SmolLM2 on 2 cores; cached on disk): faster decode steps, whose "
        "numerics differ from generate()'s in the last bits (fused norms), so a greedy near-tie can flip. "
        "Eager decode, the default, is the exact path",
    )
    group.add_argument(
        "--linear-kernel",
        default=env_default("linear_kernel", "auto"),
        choices=LINEAR_KERNELS,
        help="auto: on CPU, fp32 Linear layers multiply with weights prepacked once for oneDNN, q/k/v and gate/up "
        "as one GEMM each (decode steps 1.3-1.4x faster than with aten's matmul on the README's machine; costs a "
        "second copy of those weights); aten elsewhere",
    )
    group.add_argument(
        "--attn-implementation",
        default=env_default("attn_implementation", "auto"),
        choices=["auto", "sdpa", "eager"],
        help="auto: sdpa where the model supports it, eager where it needs it (e.g. Gemma 2's attention "
        "soft-capping); the choice is logged and reported by ModelInfo",
    )
    group.add_argument(
        "--load-format",
        default=env_default("load_format", "auto"),
        choices=["auto", "dummy"],
        help="dummy: random weights from the model's config, for benchmarks where the weights can't go",
    )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine limits")
    group.add_argument(
        "--max-batch-size",
        type=int,
        default=int(env_default("max_batch_size", "64")),
        help="most rows decoded together",
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=int(env_default("max_num_batched_tokens", str(EngineConfig.max_num_batched_tokens))),
        help="tokens computed per engine step, shared by the decoding rows (one each) and prompt chunks: a longer "
        "prompt is prefilled over several steps while the other streams keep going (must exceed --max-batch-size)",
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=int(env_default("max_queue", "1024")),
        help="waiting requests before RESOURCE_EXHAUSTED",
    )
    group.add_argument(
        "--max-context",
        type=int,
        default=int(env_default("max_context", "2048")),
        help="prompt + new tokens per request",
    )
    group.add_argument(
        "--kv-cache-memory",
        type=kv_cache_memory,
        default=kv_cache_memory(env_default("kv_cache_memory", "auto")),
        help="the paged KV cache's size (e.g. 1GiB, 512MiB; or 0.9: that fraction of the device's free memory): "
        "requests are admitted by the KV blocks they hold and preempted when blocks run out, so long contexts "
        "and many rows share one budget. auto (default): 0.9 of the free memory on a GPU, 4GiB on a CPU. "
        "0: no pool, each row holds a slot of --max-context positions (README: KV memory)",
    )
    group.add_argument(
        "--kv-admission-reserve",
        type=float,
        default=float(env_default("kv_admission_reserve", str(EngineConfig.kv_admission_reserve))),
        help="paged cache: share of its blocks that admitting a request must leave free, for running rows to "
        "grow into before any is preempted",
    )
    group.add_argument(
        "--max-requests-per-client",
        type=int,
        default=int(env_default("max_requests_per_client", "0")),
        help="in-flight requests per client (x-client-id metadata, else its address); 0: unlimited",
    )


# --kv-cache-memory auto, by device type: most of a GPU's free memory once the weights are loaded (as vLLM's
# gpu_memory_utilization), and on a CPU a fixed budget that leaves a 24 GiB machine most of its memory (as vLLM's
# VLLM_CPU_KVCACHE_SPACE, 4 GiB by default).
AUTO_KV_CACHE_MEMORY = {"cuda": 0.9, "cpu": 4 * 2**30}
_SIZE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def memory_size(text: str) -> float:
    """'1GiB', '512MiB', '2G', '1000000' (bytes), or a fraction <= 1 of the free device memory ('0.9')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (1GiB, 512MiB) or a fraction (0.9)")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]


def kv_cache_memory(text: str) -> float | str:
    """'auto' (resolved for the device by `engine_config`), or a size or fraction as `memory_size` reads it."""
    return "auto" if text.strip().lower() == "auto" else memory_size(text)


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine features")
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=env_default("enable_prefix_caching", "1") == "1",
        help="requests whose prompts begin alike (system prompts, few-shot examples, the previous chat turn) share "
        "the KV blocks of that prefix, and freed blocks stay cached until the pool needs them (paged KV cache "
        "only; on by default). A prefill that continues cached keys runs other kernel shapes, so logits may move "
        "by ~1e-6 (fp32) and a near-tie can flip: --no-enable-prefix-caching processes every prompt bit-exact",
    )
    group.add_argument(
        "--assistant-model",
        default=env_default("assistant_model", "") or None,
        help="a smaller model with the same tokenizer (HF folder or .gguf) for speculative decoding: it proposes, "
        "the model verifies a batch of proposals per pass; greedy outputs stay identical",
    )
    group.add_argument(
        "--num-assistant-tokens",
        type=int,
        default=int(env_default("num_assistant_tokens", "4")),
        help="tokens the assistant proposes per step, unless a request sets its own (0 turns it off)",
    )
    group.add_argument(
        "--speculative-max-batch-size",
        type=int,
        default=int(env_default("speculative_max_batch_size", "16")),
        help="speculate (prompt lookup, assistant) only in steps decoding at most this many rows: verifying "
        "proposals costs compute, which a large batch no longer has spare (measured on CPU: 1.42x faster at "
        "8 rows, 0.86x at 32)",
    )


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tensor parallelism (README: Tensor parallelism)")
    group.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=int(env_default("tensor_parallel_size", "1")),
        help="shard the model over N ranks on this host (one GPU each with NCCL; processes on the CPU with gloo), "
        "through the tensor-parallel plan in the model's config; every rank runs each step in lockstep. For a "
        "model that fits one device, replicas serve more",
    )
    group.add_argument(
        "--step-timeout",
        type=float,
        default=float(env_default("step_timeout", "60")),
        help="with --tensor-parallel-size: a step running longer than this counts as a hung rank, which ends the "
        "server (open streams get UNAVAILABLE, health turns NOT_SERVING, exit code 1)",
    )
    # A follower rank's place in its group: set by the leader when it starts the rank (service/cli/ranks.py).
    group.add_argument("--tp-rank", type=int, default=0, help=argparse.SUPPRESS)
    group.add_argument("--tp-port", type=int, default=0, help=argparse.SUPPRESS)


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LoRA adapters (README: LoRA adapters)")
    group.add_argument(
        "--lora-modules",
        nargs="+",
        default=env_default("lora_modules", "").split(),
        metavar="NAME=PATH",
        help="PEFT LoRA adapter folders (adapter_config.json and weights) made for the served model, loaded at "
        "start-up; a request names one (genserve.v1 `adapter`, TGIS `adapter_id`, KServe `lora_name`, the OpenAI "
        "API's `model`), and rows of different adapters share a batch. An adapter that cannot be served stops "
        "start-up with the reason",
    )
    group.add_argument(
        "--lora-dir",
        default=env_default("lora_dir", ""),
        help="a folder of adapter folders: a request may name any of them, read on first use (TGIS's adapter "
        "cache); names cannot leave the folder",
    )
    group.add_argument(
        "--allow-runtime-lora",
        action=argparse.BooleanOptionalAction,
        default=env_default("allow_runtime_lora", "0") == "1",
        help="load and unload adapters while serving: genserve.v1 LoadAdapter/UnloadAdapter, vLLM's "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter (behind the same auth; paths inside --lora-dir if set)",
    )
    group.add_argument(
        "--max-cpu-loras",
        type=int,
        default=int(env_default("max_cpu_loras", "16")),
        help="adapters kept in host memory; the least recently used one no request holds is let go (read again "
        "when named again)",
    )
    group.add_argument(
        "--max-loras",
        type=int,
        default=int(env_default("max_loras", "4")),
        help="distinct adapters in one step (the adapter slots); a request of one more waits for a slot",
    )
    group.add_argument(
        "--max-lora-rank",
        type=int,
        default=int(env_default("max_lora_rank", "16")),
        help="the largest adapter rank served (the slots are this wide); larger ones are refused",
    )


def lora_modules(entries: list[str]) -> tuple[tuple[str, str], ...]:
    """NAME=PATH entries as (name, path) pairs."""
    pairs = []
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path or not re.fullmatch(r"[\w.-]+", name):
            raise SystemExit(f"--lora-modules takes NAME=PATH (NAME: letters, digits, '_', '.', '-'), got {entry!r}")
        pairs.append((name, path))
    return tuple(pairs)


def build_engine(args: argparse.Namespace, loaded, plugins=None, lockstep=None):  # noqa: ANN001, ANN202 - lazy torch
    """The engine, built (its start-up probe pass included) off the main thread: see scheduler/model/cpu_threads.py.
    `lockstep`: this rank's place in its tensor-parallel group."""
    from genserve.scheduler import Engine, PluginRegistry, in_passing_thread, load_model

    def build() -> Engine:
        assistant = None
        if args.assistant_model:
            assistant = load_model(args.assistant_model, **load_options(args))
        config = engine_config(args)
        return Engine(loaded, config, plugins=plugins or PluginRegistry(), assistant=assistant, lockstep=lockstep)

    return in_passing_thread(build)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The one EngineConfig of the flags that `args` has (commands take subsets of them), with `overrides`."""
    flags = dict(
        max_running=getattr(args, "max_batch_size", None),
        max_num_batched_tokens=getattr(args, "max_num_batched_tokens", None),
        max_queue=getattr(args, "max_queue", None),
        max_context=getattr(args, "max_context", None),
        num_assistant_tokens=getattr(args, "num_assistant_tokens", None),
        speculation_max_rows=getattr(args, "speculative_max_batch_size", None),
        decode_mode=_decode_mode(args),
        linear_kernel=getattr(args, "linear_kernel", None),
        kv_cache_memory=_resolve_kv_cache_memory(args),
        prefix_caching=getattr(args, "enable_prefix_caching", None),
        kv_admission_reserve=getattr(args, "kv_admission_reserve", None),
        lora_modules=lora_modules(args.lora_modules) if getattr(args, "lora_modules", None) else None,
        lora_dir=getattr(args, "lora_dir", None),
        runtime_lora=getattr(args, "allow_runtime_lora", None),
        max_cpu_loras=getattr(args, "max_cpu_loras", None),
        max_loras=getattr(args, "max_loras", None),
        max_lora_rank=getattr(args, "max_lora_rank", None),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", None),
        step_timeout=getattr(args, "step_timeout", None),
    )
    values = {name: value for name, value in flags.items() if value is not None} | overrides
    if not values.get("kv_cache_memory"):
        values["prefix_caching"] = False  # it shares paged blocks: the slot cache (--kv-cache-memory 0) has none
    return EngineConfig(**values)


def _decode_mode(args: argparse.Namespace) -> str:
    if getattr(args, "compile", False):
        return "compiled"
    return "eager" if getattr(args, "no_cuda_graphs", False) else "auto"


def _resolve_kv_cache_memory(args: argparse.Namespace) -> float | None:
    setting = getattr(args, "kv_cache_memory", None)
    if setting != "auto":
        return setting
    from genserve.scheduler import resolve_device

    return AUTO_KV_CACHE_MEMORY[resolve_device(args.device).type]


def load(args: argparse.Namespace):  # noqa: ANN202
    """The model, loaded off the main thread: see scheduler/model/cpu_threads.py."""
    from genserve.scheduler import in_passing_thread, load_model

    shards = getattr(args, "tensor_parallel_size", 1)
    return in_passing_thread(load_model, args.model, **load_options(args), tensor_parallel_size=shards)


def load_options(args: argparse.Namespace) -> dict[str, object]:
    return dict(
        dtype=args.dtype,
        device=args.device,
        load_format=args.load_format,
        attn_implementation=args.attn_implementation,
    )


def int_range(text: str, flag: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        pair = int(low), int(high or low)
    except ValueError:
        raise SystemExit(f"{flag} takes MIN,MAX (integers), got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise SystemExit(f"{flag} needs 0 <= MIN <= MAX, got {text!r}")
    return pair
