"""The engine's options, written once: the CLI builds one `EngineConfig`; the engine, scheduler and runner read it."""

from __future__ import annotations

from dataclasses import dataclass

DECODE_MODES = ("auto", "eager", "static", "compiled")
LINEAR_KERNELS = ("auto", "aten", "onednn")


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 64  # batch rows (a request with classifier-free guidance holds two)
    # Tokens computed per step, shared by the decoding rows (one each) and prompt chunks: a long prompt is
    # prefilled over several steps while the running rows keep streaming (README: "Chunked prefill").
    max_num_batched_tokens: int = 384
    max_queue: int = 1024  # waiting requests before a submit is refused
    max_context: int = 2048  # prompt + new tokens per request
    seed: int = 0  # the shared generator of unseeded sampling rows
    # Automatic prefix caching over the paged cache's blocks (kv_blocks.py): requests sharing a prompt prefix
    # share its KV blocks, and freed blocks stay cached until the pool needs them. Needs kv_cache_memory > 0.
    prefix_caching: bool = False
    num_assistant_tokens: int = 4  # assistant-model proposals per step, for requests that do not set theirs
    # Speculate only in steps decoding at most this many rows: past that, verifying proposals costs more compute
    # than the passes it saves.
    speculation_max_rows: int = 16
    # "auto": decode steps from CUDA graphs on a GPU, eager on CPU; "eager": never capture (--no-cuda-graphs);
    # "static": pad to the graphs' buckets even on CPU (what tests use to run the captured path without a GPU);
    # "compiled": on CPU, decode passes through torch.compile, traced at start-up (model/compiled_step.py; its
    # numerics differ from generate()'s in the last bits).
    decode_mode: str = "auto"
    # "auto": fp32 Linear layers on CPU multiply with weights prepacked for oneDNN (cpu_linear.py), else aten's
    # plain matmul ("aten" forces that everywhere).
    linear_kernel: str = "auto"
    # 0: a slot of max_context positions per row (slot_cache.py). Otherwise a paged cache of this many bytes, or
    # of this fraction of the device's free memory when <= 1 (paged_cache.py): requests are admitted and
    # preempted by the KV blocks they hold (kv_blocks.py).
    kv_cache_memory: float = 0.0
    kv_admission_reserve: float = 0.05  # share of the blocks admission leaves free for running rows to grow into
    # LoRA adapters (scheduler/model/lora_*.py): PEFT adapter folders loaded at start-up, (name, path); requests
    # name one in RequestOptions.adapter. A step holds rows of at most max_loras distinct adapters (the device's
    # adapter slots); ranks above max_lora_rank are refused.
    lora_modules: tuple[tuple[str, str], ...] = ()
    lora_dir: str = ""  # requests may also name any adapter folder under it, read on first use
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 16  # adapters kept in host memory (least recently used ones unheld are let go)
    runtime_lora: bool = False  # adapters may be loaded and unloaded while serving (the admin RPC)
    # Tensor parallelism (engine/lockstep.py): the model is sharded over this many ranks, each running this same
    # engine in lockstep; a step that takes longer than step_timeout seconds counts as a hung rank.
    tensor_parallel_size: int = 1
    step_timeout: float = 60.0

    @property
    def paged(self) -> bool:
        return self.kv_cache_memory > 0

    @property
    def serves_adapters(self) -> bool:
        return bool(self.lora_modules or self.lora_dir or self.runtime_lora)

    def __post_init__(self) -> None:
        for name in (
            "max_running",
            "max_num_batched_tokens",
            "max_queue",
            "max_context",
            "max_loras",
            "max_lora_rank",
            "max_cpu_loras",
            "tensor_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens <= self.max_running:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must exceed max_running "
                f"({self.max_running}): a step full of decoding rows still needs room for a prompt chunk"
            )
        if self.kv_cache_memory < 0:
            raise ValueError(f"kv_cache_memory must be >= 0, got {self.kv_cache_memory}")
        if self.prefix_caching and not self.paged:
            raise ValueError("prefix_caching shares the paged KV cache's blocks: it needs kv_cache_memory > 0")
        if not 0 <= self.kv_admission_reserve < 1:
            raise ValueError(f"kv_admission_reserve must be in [0, 1), got {self.kv_admission_reserve}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)}, got {self.decode_mode!r}")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"lora_modules need distinct, non-empty names, got {names}")
        if self.decode_mode == "compiled" and self.serves_adapters:
            raise ValueError("the compiled decode step (--compile) does not serve LoRA adapters")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}")
        if self.step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0, got {self.step_timeout}")
        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()

    def _check_tensor_parallel(self) -> None:
        """What the sharded model step does not run, refused at start-up with the flag to change."""
        refused = {
            "LoRA adapters (--lora-modules, --lora-dir, --allow-runtime-lora)": self.serves_adapters,
            "CUDA graphs or static decode buckets (use --no-cuda-graphs)": self.decode_mode == "static",
            "the compiled decode step (drop --compile)": self.decode_mode == "compiled",
            "the oneDNN-prepacked Linear kernel (use --linear-kernel aten or auto)": self.linear_kernel == "onednn",
        }
        for what, asked in refused.items():
            if asked:
                raise ValueError(f"tensor parallelism does not serve {what}")
