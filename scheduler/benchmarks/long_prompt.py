"""`genserve bench --long-prompt`: how long running streams stall while a long prompt is admitted.

Four streams decode; then a prompt of about --long-prompt-tokens arrives. In one run: that prompt's prefill time
on an idle engine, then for each step budget (chunked at --max-num-batched-tokens, and the whole prompt in one
step, as before chunking) the largest gap between two tokens of the streams while the long prompt was being
prefilled, as a fraction of the idle prefill time; and whether the long prompt's greedy tokens equal
`generate()`'s on it alone.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

import torch

from genserve.scheduler.benchmarks.throughput import CONTEXT, QUESTIONS, chat_ids
from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import RequestOptions, TokenEvent
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.loader import LoadedModel

NUM_STREAMS = 4
LONG_NEW_TOKENS = 16
WARM_STEPS = 4  # the streams decode this many steps before the long prompt arrives


@dataclass(frozen=True)
class StallResult:
    name: str
    longest_gap: float  # seconds between two tokens of one stream, while the long prompt prefilled
    median_gap: float
    first_token_seconds: float  # the long prompt's arrival to its first token
    long_tokens: list[int]


def long_prompt(loaded: LoadedModel, num_tokens: int) -> list[int]:
    """A chat prompt of at least `num_tokens` tokens: background paragraphs, then a question."""
    repeats = 1
    while len(ids := chat_ids(loaded, CONTEXT * repeats + QUESTIONS[4])) < num_tokens:
        repeats += 1
    return ids


def idle_prefill_seconds(loaded: LoadedModel, config: EngineConfig, prompt: list[int], repeats: int = 3) -> float:
    """The fastest of `repeats` prefills of `prompt` in one step, alone on an engine (the first pays warm-up)."""
    whole = dataclasses.replace(config, max_num_batched_tokens=max(config.max_num_batched_tokens, len(prompt) + 1))
    engine = Engine(loaded, whole)
    times = []
    for index in range(repeats):
        engine.submit(prompt, engine.make_parameters(max_new_tokens=1), RequestOptions(request_id=str(index)))
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_stall(loaded: LoadedModel, config: EngineConfig, name: str, prompt: list[int]) -> StallResult:
    """Four streams decode, the long prompt arrives; the streams' token gaps while it prefilled."""
    engine = Engine(loaded, config)
    arrivals: dict[str, list[float]] = {}
    long_tokens: list[int] = []

    def record(events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        for event in events:
            arrivals.setdefault(event.request_id, []).extend([now] * len(event.token_ids))
            if event.request_id == "long":
                long_tokens.extend(event.token_ids)

    engine.on_events = record
    for index in range(NUM_STREAMS):
        stream = chat_ids(loaded, QUESTIONS[index])
        params = engine.make_parameters(max_new_tokens=LONG_NEW_TOKENS * 4, ignore_eos=True)
        engine.submit(stream, params, RequestOptions(request_id=f"stream{index}"))
    for _ in range(WARM_STEPS):
        engine.step()
    greedy = engine.make_parameters(max_new_tokens=LONG_NEW_TOKENS, do_sample=False)
    engine.submit(prompt, greedy, RequestOptions(request_id="long"))
    arrived = time.perf_counter()
    while "long" not in arrivals:
        engine.step()
    first_token = arrivals["long"][0]
    for index in range(NUM_STREAMS):
        engine.cancel(f"stream{index}")
    while engine.step():
        pass
    gaps = [
        later - earlier
        for index in range(NUM_STREAMS)
        for earlier, later in zip(arrivals[f"stream{index}"], arrivals[f"stream{index}"][1:])
        if later > arrived and earlier < first_token
    ]
    return StallResult(name, max(gaps), statistics.median(gaps), first_token - arrived, long_tokens)


def generate_alone(loaded: LoadedModel, prompt: list[int]) -> list[int]:
    model = loaded.model
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt], device=model.device), max_new_tokens=LONG_NEW_TOKENS, do_sample=False
        )
    return output[0, len(prompt) :].tolist()


def run_long_prompt(
    loaded: LoadedModel, config: EngineConfig, num_tokens: int
) -> tuple[list[int], float, list[StallResult], list[int]]:
    """The prompt, its idle prefill time, one result per budget (chunked, then whole), and generate()'s tokens."""
    prompt = long_prompt(loaded, num_tokens)
    idle = idle_prefill_seconds(loaded, config, prompt)
    whole = dataclasses.replace(config, max_num_batched_tokens=len(prompt) + NUM_STREAMS + 1)
    results = [
        measure_stall(loaded, config, f"chunked, {config.max_num_batched_tokens} tokens/step", prompt),
        measure_stall(loaded, whole, "whole prompt in one step", prompt),
    ]
    return prompt, idle, results, generate_alone(loaded, prompt)


def format_long_prompt_report(prompt: list[int], idle: float, results: list[StallResult], expected: list[int]) -> str:
    lines = [
        f"Long prompt admitted while {NUM_STREAMS} streams decode: {len(prompt)}-token prompt, "
        f"{idle:.2f} s to prefill on an idle engine",
        "",
        "| budget | longest stream gap | / idle prefill | median gap | long prompt's first token | "
        f"its {LONG_NEW_TOKENS} greedy tokens = generate() |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        same = "yes" if result.long_tokens == expected else "NO"
        lines.append(
            f"| {result.name} | {result.longest_gap:.3f} s | {result.longest_gap / idle:.2f} | "
            f"{result.median_gap:.3f} s | {result.first_token_seconds:.2f} s | {same} |"
        )
    return "\n".join(lines)
