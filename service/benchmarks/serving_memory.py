"""`genserve bench --serving-memory`: a serving process's resident memory next to its parts.

`genserve serve` runs in a process of its own, once per linear kernel (and per decode mode: eager, and with
`--compile` the compiled step too), serves a few warm-up requests, and its
resident set (VmRSS) is read from /proc. Its parts: the weights (the model folder's safetensors), the KV pool (the
`--kv-cache-memory` given, which the pool fills to within one block, every byte written when allocated) and a
process that imported the same libraries and ran a matmul but loaded no model. What is left over, RSS less the
pool and less that process, is what the model costs in memory; with one copy of the weights it is close to the
weights' size. With `--compile` that process also imports the compiler and compiles one small function (inductor's
C++ toolchain and runtime), since the server imports and runs those too: what the step's own graphs and code cost
stays in the model's share. Both the server and that process hand their freed heap back to the system before they
are read (service/ops/heap.py), as the server does before it turns SERVING.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from genserve.service.benchmarks.local_server import serve_process, stream_all
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

# What `genserve serve` imports before it loads a model, and one matmul (oneDNN's and OpenMP's own start-up).
LIBRARIES_ONLY = """
import torch, transformers, grpc, fastapi, uvicorn
import genserve.service.cli.serve, genserve.service.server, genserve.scheduler.engine.async_engine
import transformers.models.llama.modeling_llama
torch.nn.functional.linear(torch.ones(16, 64), torch.ones(64, 64))
"""
# What `genserve serve --compile` imports and runs besides: dynamo and inductor, which build and load a C++ kernel.
COMPILER_TOO = """
torch.compile(lambda x: x * 2 + 1, dynamic=True)(torch.ones(16))
"""
# As the server does before it turns SERVING, the process hands its freed heap back before it is read.
READ_STATUS = """
from genserve.service.ops.heap import release_free_heap
release_free_heap()
print(open("/proc/self/status").read())
"""


@dataclass(frozen=True)
class ServingMemory:
    linear_kernel: str
    rss: int
    kv_pool: int
    libraries_only: int
    weights: int
    compiled: bool = False  # served with `--compile`

    @property
    def mode(self) -> str:
        return f"{self.linear_kernel}, --compile" if self.compiled else self.linear_kernel

    @property
    def model_share(self) -> int:
        return self.rss - self.kv_pool - self.libraries_only

    @property
    def ratio(self) -> float:
        return self.model_share / self.weights


def resident_bytes(status: str) -> int:
    """VmRSS from a /proc/PID/status text."""
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def libraries_only_rss(compiled: bool = False) -> int:
    """The RSS of a process that imports what the server imports (and with `compiled`, compiles as it does), but
    loads no model."""
    program = LIBRARIES_ONLY + (COMPILER_TOO if compiled else "") + READ_STATUS
    return resident_bytes(subprocess.run([sys.executable, "-c", program], capture_output=True, text=True).stdout)


def weight_file_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def measure(
    model: str, folder: Path, linear_kernel: str, kv_pool_bytes: int, log_path: Path, compiled: bool = False
) -> ServingMemory:
    flags = ["--model", model, "--linear-kernel", linear_kernel, "--kv-cache-memory", str(kv_pool_bytes)]
    flags += ["--compile"] if compiled else []
    with serve_process(flags, log_path) as served:
        request = pb.GenerateRequest(
            input_ids=pb.TokenIds(ids=list(range(10, 74))),
            parameters=pb.GenerationParameters(max_new_tokens=16, do_sample=False, ignore_eos=True),
        )
        stream_all(served.grpc_target, [request] * 4)
        rss = resident_bytes(Path(f"/proc/{served.pid}/status").read_text())
    return ServingMemory(
        linear_kernel, rss, kv_pool_bytes, libraries_only_rss(compiled), weight_file_bytes(folder), compiled
    )


def format_memory(results: list[ServingMemory]) -> str:
    mib = 2**20
    lines = [
        "a `genserve serve` process's resident memory after warm-up, and its parts (MiB)",
        "| linear kernel, mode | RSS | KV pool | libraries only | RSS - pool - libraries | weights | that / weights |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.rss / mib:.0f} | {r.kv_pool / mib:.0f} | {r.libraries_only / mib:.0f} | "
            f"{r.model_share / mib:.0f} | {r.weights / mib:.0f} | {r.ratio:.2f}x |"
        )
    return "\n".join(lines)
