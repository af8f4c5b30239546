"""`genserve bench --kv-capacity`: how many requests one KV budget serves at once, slots against paged blocks.

Both runs get the same budget (`--kv-cache-memory`) and context (`--max-context`). The slot design holds
max_context positions per row, so the budget buys budget // (max_context x bytes per token) rows; the paged
cache holds what each request has, so the same budget admits as many requests as their tokens fit. Every
request arrives at once; the report gives the peak of running requests (what `genserve_running_requests` shows
after each step) and the throughput of each run. The slot design, which serves its few rows one batch after
another, runs the first SLOT_BATCHES x its rows of the requests (its peak is its row count either way).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from genserve.scheduler.benchmarks.throughput import Workload, run_genserve
from genserve.scheduler.core.snapshot import EngineSnapshot
from genserve.scheduler.kv.slot_cache import SlotKVCache
from genserve.scheduler.model.cpu_threads import in_passing_thread
from genserve.scheduler.model.loader import LoadedModel

SLOT_BATCHES = 4


@dataclass(frozen=True)
class CapacityResult:
    design: str
    rows: int  # the engine's row limit
    peak_running: int
    peak_tokens_held: int  # KV positions held by the running requests, at most
    tokens_per_second: float


def capacity_workload(loaded: LoadedModel, num_requests: int, request_tokens: int, new_tokens: int) -> Workload:
    """Random-token prompts, so that every request holds `request_tokens` positions at its end."""
    rng = random.Random(0)
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    prompt_tokens = request_tokens - new_tokens
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(num_requests)]
    return Workload(prompts, [new_tokens] * num_requests)


def run_kv_capacity(
    loaded: LoadedModel, memory_bytes: int, max_context: int, max_rows: int, workload: Workload
) -> list[CapacityResult]:
    bytes_per_token = SlotKVCache.for_model(loaded.model, 1, 1, 0).bytes_per_token
    slot_rows = memory_bytes // (max_context * bytes_per_token)
    if slot_rows < 1:
        raise ValueError(f"{memory_bytes} bytes hold no slot of {max_context} positions")
    slot_count = SLOT_BATCHES * slot_rows
    slot_workload = Workload(workload.prompts[:slot_count], workload.max_new_tokens[:slot_count])
    designs = (("slot per row", slot_rows, 0, slot_workload), ("paged", max_rows, memory_bytes, workload))
    results = []
    for design, rows, kv_cache_memory, requests in designs:
        snapshots: list[EngineSnapshot] = []
        result = in_passing_thread(
            run_genserve,
            loaded,
            requests,
            rows,
            name=design,
            engine_options={"max_context": max_context, "kv_cache_memory": kv_cache_memory},
            overrides={"ignore_eos": True},
            on_step=lambda engine: snapshots.append(engine.snapshot),
        )
        peak_running = max(snapshot.num_running for snapshot in snapshots)
        peak_held = max(snapshot.tokens_held for snapshot in snapshots)
        results.append(CapacityResult(design, rows, peak_running, peak_held, result.tokens_per_second))
    return results


def format_capacity_report(
    results: list[CapacityResult], memory_bytes: int, max_context: int, request_tokens: int
) -> str:
    slot = results[0]
    lines = [
        f"KV budget {memory_bytes / 2**30:.2f} GiB, --max-context {max_context}, requests of {request_tokens} tokens",
        "",
        "| KV design | row limit | peak running requests | x slot | peak KV tokens held | tokens/s | x slot |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        more_requests = result.peak_running / slot.peak_running
        faster = result.tokens_per_second / slot.tokens_per_second
        lines.append(
            f"| {result.design} | {result.rows} | {result.peak_running} | {more_requests:.1f}x "
            f"| {result.peak_tokens_held} | {result.tokens_per_second:.1f} | {faster:.2f}x |"
        )
    return "\n".join(lines)
