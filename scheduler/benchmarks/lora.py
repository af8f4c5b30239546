"""`genserve bench --lora`: what serving LoRA adapters costs, against the base model alone in the same run.

One workload, four runs on the same model: `rows` requests of `context` random tokens, `new_tokens` generated
each (eos ignored), all submitted at once, so that every decode step holds every row.
- the base model, on an engine that serves no adapters;
- an engine serving the adapters, every row on the base model (what the wrappers cost when no row uses one);
- every row on one adapter (a pass of one adapter multiplies by its factors directly);
- rows spread round-robin over the adapters and the base model (each row selecting its own slot's part).
The adapters are random, of rank `rank`, on every projection of every layer, written in PEFT's format (its
adapter_config.json and factor names) and read back by PEFT, as a user's adapters are. Serving adapters wraps the
model's projections for good, so the base model alone runs once, first; the other three then run `rounds` times in
turn, each reported as the median over its rounds, so that a noisy moment of a shared machine weighs on one round
of each rather than on one run.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from tqdm import tqdm

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import RequestOptions
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.loader import LoadedModel
from genserve.scheduler.model.lora_layers import lora_targets


@dataclass(frozen=True)
class LoraRun:
    label: str
    step_seconds: float  # median decode step
    tokens_per_second: float  # generated tokens over the whole run, prefill included


def write_adapters(model: torch.nn.Module, folder: Path, count: int, rank: int, seed: int = 0) -> dict[str, Path]:
    """`count` random adapters of `model` (rank `rank`, every projection), as PEFT saves them."""
    targets = lora_targets(model)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for index in range(count):
        name = f"adapter-{index}"
        path = folder / name
        modules = sorted({module.rpartition(".")[2] for module in targets})
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules).save_pretrained(str(path))
        factors = {}
        for module, (in_features, out_features) in targets.items():
            prefix = f"base_model.model.{module}"
            factors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features
            factors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) / rank
        save_file(factors, str(path / "adapter_model.safetensors"))
        adapters[name] = path
    return adapters


def _run(
    loaded: LoadedModel, config: EngineConfig, label: str, assignment: list[str], context: int, new_tokens: int
) -> LoraRun:
    engine = Engine(loaded, config)
    rng = random.Random(0)
    for index, adapter in enumerate(assignment):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(context)]
        params = engine.make_parameters(max_new_tokens=new_tokens, ignore_eos=True)
        engine.submit(prompt, params, RequestOptions(request_id=str(index), adapter=adapter))
    steps = []
    started = time.perf_counter()
    while True:
        step_started = time.perf_counter()
        if not engine.step():
            break
        steps.append(time.perf_counter() - step_started)
    elapsed = time.perf_counter() - started
    decode_steps = steps[2:]  # after the prefill step and the first decode step (one-off costs)
    return LoraRun(label, statistics.median(decode_steps), len(assignment) * new_tokens / elapsed)


def run_lora_benchmark(
    loaded: LoadedModel, rows: int, context: int, new_tokens: int, num_adapters: int, rank: int, rounds: int = 3
) -> list[LoraRun]:
    base = EngineConfig(
        max_running=rows, max_context=context + new_tokens + 2, max_num_batched_tokens=rows * (context + 1)
    )
    with tempfile.TemporaryDirectory() as folder:
        adapters = write_adapters(loaded.model, Path(folder), num_adapters, rank)
        modules = tuple((name, str(path)) for name, path in adapters.items())
        serving = dataclasses.replace(base, lora_modules=modules, max_loras=num_adapters, max_lora_rank=rank)
        names = list(adapters)
        mixed = [([*names, ""] * rows)[index] for index in range(rows)]
        served = [
            ("adapters served, every row on the base", serving, [""] * rows),
            ("every row on one adapter", serving, [names[0]] * rows),
            (f"{num_adapters} adapters and the base, mixed", serving, mixed),
        ]
        runs = [("base model, no adapters served", base, [""] * rows), *served * rounds]
        measured: dict[str, list[LoraRun]] = {}
        for label, config, assignment in tqdm(runs, desc="LoRA runs", unit="run", leave=False):
            measured.setdefault(label, []).append(_run(loaded, config, label, assignment, context, new_tokens))
        return [
            LoraRun(
                label,
                statistics.median(run.step_seconds for run in repeats),
                statistics.median(run.tokens_per_second for run in repeats),
            )
            for label, repeats in measured.items()
        ]


def format_lora_report(runs: list[LoraRun], rows: int, context: int, new_tokens: int, rank: int, rounds: int) -> str:
    base = runs[0]
    lines = [
        f"LoRA adapters: {rows} rows of {context} prompt tokens, {new_tokens} new tokens each; rank-{rank} adapters "
        f"on every projection; the base model alone once, the others the median of {rounds} rounds",
        "",
        "| run | decode step | vs base | tokens/s (end to end) |",
        "|---|---:|---:|---:|",
    ]
    for run in runs:
        ratio = run.step_seconds / base.step_seconds
        lines.append(f"| {run.label} | {run.step_seconds * 1e3:.1f} ms | {ratio:.2f}x | {run.tokens_per_second:.1f} |")
    return "\n".join(lines)
