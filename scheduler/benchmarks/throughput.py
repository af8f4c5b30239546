"""`genserve bench`: one workload through genserve and, in the same run, through Hugging Face's own ways to serve it.

Baselines: `generate()` one request at a time, `generate()` on static batches of the engine's max batch size
(left-padded; a batch runs until its longest request is done), and transformers' continuous batching manager
(the engine behind `generate_batch`, given each request's own max_new_tokens). Throughput counts only useful
tokens: each request's tokens up to its own max_new_tokens or eos. The ceiling is a bare decode step (a plain
forward pass with HF's DynamicCache, through genserve's linear kernel) at the same batch size: the best any
scheduler around this model could do. The HF baselines run the model as loaded, as a user of HF would.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm
from transformers import ContinuousBatchingConfig, DynamicCache, GenerationConfig

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import RequestOptions, TokenEvent
from genserve.scheduler.core.snapshot import TokenCounters
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.cpu_linear import is_prepacked, with_linear_kernel
from genserve.scheduler.model.cpu_threads import in_passing_thread
from genserve.scheduler.model.loader import LoadedModel

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain how a refrigerator keeps food cold.",
    "Give me three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Summarize the plot of a detective story in a few sentences.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Describe a busy market in the morning.",
    "What are the benefits of regular exercise?",
    "Explain what a prime number is, with examples.",
    "Write a friendly email inviting a colleague to lunch.",
]
CONTEXT = (
    "Background notes: the city council met on Tuesday to discuss the new park, the library hours, the bus routes "
    "and the budget for street lighting. Residents asked many questions and the meeting ran late. "
)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_new_tokens: list[int]


@dataclass(frozen=True)
class BenchResult:
    name: str
    seconds: float
    generated_tokens: int
    outputs: list[list[int]] | None = None  # per request, in workload order
    counters: TokenCounters | None = None  # genserve's prefix-cache and speculation totals
    first_token_seconds: tuple[float, ...] = ()  # per request, from the start of the run (all arrive at once)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds


def default_workload(
    loaded: LoadedModel,
    num_prompts: int = 64,
    min_new_tokens: int = 16,
    max_new_tokens: int = 256,
    seed: int = 0,
    context_paragraphs: tuple[int, int] = (0, 6),
) -> Workload:
    """Chat prompts of mixed lengths (a number of paragraphs of context drawn from `context_paragraphs`, then a
    question), max_new_tokens uniform in [min, max]."""
    rng = random.Random(seed)
    prompts, budgets = [], []
    for i in range(num_prompts):
        content = CONTEXT * rng.randint(*context_paragraphs) + QUESTIONS[i % len(QUESTIONS)]
        if loaded.tokenizer is not None:
            ids = chat_ids(loaded, content)
        else:
            ids = [rng.randrange(loaded.model.config.vocab_size) for _ in range(rng.randint(16, 160))]
        prompts.append(ids)
        budgets.append(rng.randint(min_new_tokens, max_new_tokens))
    return Workload(prompts, budgets)


def chat_ids(loaded: LoadedModel, content: str) -> list[int]:
    """One user message through the model's chat template (plain encoding for a model without one)."""
    tokenizer = loaded.tokenizer
    if not tokenizer.chat_template:
        return tokenizer.encode(content)
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def _eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else eos or [])


def _useful(tokens: list[int], budget: int, eos: set[int]) -> list[int]:
    """A request's own output inside a longer batched run: up to its max_new_tokens, and up to its first eos."""
    tokens = tokens[:budget]
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def run_genserve(
    loaded: LoadedModel,
    workload: Workload,
    max_batch_size: int,
    name: str = "genserve",
    engine_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    on_step: Callable[[Engine], None] = lambda engine: None,
) -> BenchResult:
    """The workload through the engine; `engine_options` are EngineConfig fields, `overrides` go to every
    request, `on_step` sees the engine after each step."""
    options = {"max_queue": len(workload.prompts) + 1} | (engine_options or {})
    engine = Engine(loaded, EngineConfig(max_running=max_batch_size, **options))
    outputs: dict[str, list[int]] = {}
    first_token_at: dict[str, float] = {}

    def collect(events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for event in events:
            outputs.setdefault(event.request_id, []).extend(event.token_ids)
            first_token_at.setdefault(event.request_id, now)

    engine.on_events = collect
    started = time.perf_counter()
    for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.max_new_tokens)):
        params = engine.make_parameters(max_new_tokens=budget, **(overrides or {}))
        engine.submit(prompt, params, RequestOptions(request_id=str(i)))
    with tqdm(total=len(workload.prompts), desc=name, unit="req", leave=False) as bar:
        while engine.step():
            on_step(engine)
            bar.n = len(workload.prompts) - engine.num_running - engine.num_waiting
            bar.refresh()
    seconds = time.perf_counter() - started
    ordered = [outputs[str(i)] for i in range(len(workload.prompts))]
    first_tokens = tuple(first_token_at[str(i)] - started for i in range(len(workload.prompts)))
    return BenchResult(name, seconds, sum(map(len, ordered)), ordered, engine.runner.counters(), first_tokens)


@torch.inference_mode()
def run_hf_sequential(loaded: LoadedModel, workload: Workload) -> BenchResult:
    model, outputs = loaded.model, []
    started = time.perf_counter()
    for prompt, budget in tqdm(
        list(zip(workload.prompts, workload.max_new_tokens)), desc="HF one at a time", leave=False
    ):
        ids = torch.tensor([prompt], device=model.device)
        outputs.append(model.generate(ids, max_new_tokens=budget, do_sample=False)[0, len(prompt) :].tolist())
    seconds = time.perf_counter() - started
    return BenchResult("HF generate(), one at a time", seconds, sum(map(len, outputs)), outputs)


@torch.inference_mode()
def run_hf_static(loaded: LoadedModel, workload: Workload, batch_size: int) -> BenchResult:
    model, eos, outputs = loaded.model, _eos_ids(loaded), []
    pad_id = model.generation_config.pad_token_id
    pad_id = pad_id if pad_id is not None else min(eos, default=0)
    started = time.perf_counter()
    for start in tqdm(range(0, len(workload.prompts), batch_size), desc="HF static batches", leave=False):
        prompts = workload.prompts[start : start + batch_size]
        budgets = workload.max_new_tokens[start : start + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        generated = model.generate(
            ids, attention_mask=mask, max_new_tokens=max(budgets), do_sample=False, pad_token_id=pad_id
        )[:, width:]
        outputs += [_useful(row, budget, eos) for row, budget in zip(generated.tolist(), budgets)]
    seconds = time.perf_counter() - started
    return BenchResult(f"HF generate(), static batches of {batch_size}", seconds, sum(map(len, outputs)), outputs)


@torch.inference_mode()
def run_hf_continuous(loaded: LoadedModel, workload: Workload, max_batch_size: int) -> BenchResult:
    model, results = loaded.model, {}
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(workload.max_new_tokens),
        eos_token_id=sorted(_eos_ids(loaded)),
        pad_token_id=model.generation_config.pad_token_id,
    )
    started = time.perf_counter()
    # The same row limit as genserve's: at most max_batch_size requests decoded together.
    batching = ContinuousBatchingConfig(max_requests_per_batch=max_batch_size)
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=batching, block=True, timeout=5
    ) as manager:
        for i, (prompt, budget) in enumerate(zip(workload.prompts, workload.max_new_tokens)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=budget)
        with tqdm(total=len(workload.prompts), desc="HF continuous batching", leave=False) as bar:
            while len(results) < len(workload.prompts):
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = list(result.generated_tokens)
                    bar.update(1)
                elif result is None and not manager.is_running():
                    raise RuntimeError("transformers' continuous batching manager stopped early")
    seconds = time.perf_counter() - started
    outputs = [results[str(i)] for i in range(len(workload.prompts))]
    return BenchResult("HF continuous batching (generate_batch)", seconds, sum(map(len, outputs)), outputs)


@torch.inference_mode()
def decode_ceiling(
    loaded: LoadedModel, batch_size: int, context: int, linear_kernel: str = "auto", steps: int = 16
) -> float:
    """Tokens/s of bare decode forward passes (HF DynamicCache, no sampling, no scheduling) at this batch size."""
    model = with_linear_kernel(loaded.model, linear_kernel, batch_hint=batch_size)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, context), device=model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    next_ids = ids[:, -1:]
    started = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=next_ids, cache=cache, use_cache=True).logits
        next_ids = logits[:, -1:].argmax(-1)
    next_ids.tolist()
    return batch_size * steps / (time.perf_counter() - started)


def run_benchmark(
    loaded: LoadedModel,
    workload: Workload,
    max_batch_size: int,
    baselines: tuple[str, ...] = ("sequential", "static", "continuous"),
    log: Callable[[str], None] = print,
    engine_options: dict[str, Any] | None = None,
    genserve: Callable[[Workload], BenchResult] | None = None,
) -> tuple[list[BenchResult], float]:
    """`genserve` runs the workload through genserve some other way (e.g. over gRPC); default: the engine.
    Every run has a passing thread of its own, so that none leaves torch's worker threads behind to slow the
    next (scheduler/model/cpu_threads.py)."""
    genserve = genserve or (lambda w: run_genserve(loaded, w, max_batch_size, engine_options=engine_options))
    # genserve's engine packs the model's Linear layers in place: transformers' own runs get the model as loaded
    # (or packed as well, where an engine packed it before this benchmark).
    plain = loaded if is_prepacked(loaded.model) else replace(loaded, model=copy.deepcopy(loaded.model))
    # Warm-up: first calls pay one-off costs (allocator, kernels) that belong to nobody's throughput.
    warm = Workload(workload.prompts[:2], [4, 4])
    in_passing_thread(genserve, warm)
    in_passing_thread(run_hf_sequential, plain, warm)
    results = [in_passing_thread(genserve, workload)]
    log(f"{results[0].name}: {results[0].tokens_per_second:.1f} tokens/s")
    runners = {
        "sequential": lambda: run_hf_sequential(plain, workload),
        "static": lambda: run_hf_static(plain, workload, max_batch_size),
        "continuous": lambda: run_hf_continuous(plain, workload, max_batch_size),
        "slots": lambda: run_genserve(
            loaded,
            workload,
            max_batch_size,
            "genserve, a KV slot per row",
            (engine_options or {}) | {"kv_cache_memory": 0},
        ),
    }
    for name in baselines:
        result = in_passing_thread(runners[name])
        results.append(result)
        log(f"{result.name}: {result.tokens_per_second:.1f} tokens/s")
    mean_context = sum(map(len, workload.prompts)) // len(workload.prompts) + sum(workload.max_new_tokens) // (
        2 * len(workload.prompts)
    )
    kernel = (engine_options or {}).get("linear_kernel", "auto")
    ceiling = in_passing_thread(decode_ceiling, loaded, max_batch_size, mean_context, kernel)
    return results, ceiling


def format_report(results: list[BenchResult], ceiling: float, max_batch_size: int) -> str:
    ours = results[0]
    lines = [
        "| system | tokens | seconds | tokens/s | genserve speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result.name} | {result.generated_tokens} | {result.seconds:.1f} | {result.tokens_per_second:.1f} "
            f"| {ours.tokens_per_second / result.tokens_per_second:.2f}x |"
        )
    lines.append(
        f"\nbare decode-step ceiling at batch {max_batch_size}: {ceiling:.1f} tokens/s; "
        f"genserve reaches {ours.tokens_per_second / ceiling:.0%} of it"
    )
    sequential = next((r for r in results if r.name.startswith("HF generate(), one")), None)
    if sequential is not None and ours.outputs and sequential.outputs:
        same = sum(a == b for a, b in zip(ours.outputs, sequential.outputs))
        lines.append(f"greedy outputs identical to generate(): {same}/{len(ours.outputs)} requests")
    return "\n".join(lines)
