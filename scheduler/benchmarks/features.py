"""`genserve bench --features`: what prompt-lookup speculation and prefix caching buy, each measured in the same
run against plain genserve on a workload made for it.

- prompt lookup: "quote this passage back" chat prompts, where the answer repeats the prompt; greedy outputs
  must stay identical, the ratio is tokens/s with speculation over without.
- prefix caching: one long system prompt with few-shot examples shared by every request; the ratio is prompt
  tokens computed without the cache over with it, next to the wall-time ratio.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any

from genserve.scheduler.benchmarks.throughput import BenchResult, Workload, run_genserve
from genserve.scheduler.model.loader import LoadedModel

_PASSAGES = [
    "The old lighthouse stood at the edge of the cliff for two hundred years. Every night its keeper climbed the "
    "ninety steps, trimmed the wick and polished the great lens, so that ships far out at sea would know where "
    "the rocks were hiding beneath the waves.",
    "Bread needs only four things: flour, water, salt and time. Mix them, let the dough rest, fold it gently "
    "every half hour, and bake it in the hottest oven you have until the crust sings when you tap it.",
    "The committee agreed on three points. First, the library will open an hour earlier on weekdays. Second, "
    "the bus route along the river will run every fifteen minutes. Third, the new park will have a small pond.",
    "A river does not hurry, yet it carves canyons. It finds the lowest path, carries what it can, leaves what "
    "it must, and reaches the sea by going around every obstacle it cannot move.",
    "To reset the device, hold the power button for ten seconds until the light blinks twice, release it, wait "
    "for the light to turn green, and then press the button once more to confirm the reset.",
    "The museum's new wing holds paintings from the northern coast: fishing boats at dawn, storms over grey "
    "water, and small harbours where the houses are painted red, yellow and blue.",
]
_INSTRUCTIONS = (
    "You are a careful assistant for a city information desk. Answer in one or two sentences, politely, and "
    "only with facts from the notes below. If the notes do not say, answer that you do not know.\n\n"
    "Notes: The library opens at 8 on weekdays and 10 on weekends. Bus 12 runs along the river every fifteen "
    "minutes from 6 to 23. The swimming pool is closed on Mondays. The town hall accepts passport applications "
    "on Tuesdays and Thursdays. The farmers market is on Saturday mornings in the main square. Parking is free "
    "on Sundays. The museum's new wing opens next month.\n\n"
    "Example question: When does the library open on Saturday?\nExample answer: The library opens at 10 on "
    "weekends, so at 10 on Saturday.\n\n"
    "Example question: Can I swim on Monday?\nExample answer: No, the swimming pool is closed on Mondays.\n\n"
    "Example question: Where is the farmers market?\nExample answer: It is held on Saturday mornings in the main "
    "square.\n"
)
_DESK_QUESTIONS = [
    "When can I apply for a passport?",
    "How often does bus 12 run?",
    "Is parking free on Sunday?",
    "When does the museum's new wing open?",
    "Is the library open at 9 on Wednesday?",
    "Where can I buy vegetables on Saturday?",
    "What time does the last bus leave?",
    "Can I visit the town hall on Friday for a passport?",
]


@dataclass(frozen=True)
class FeatureComparison:
    feature: str
    plain: BenchResult
    enabled: BenchResult

    @property
    def identical(self) -> int:
        return sum(a == b for a, b in zip(self.plain.outputs or [], self.enabled.outputs or []))


def _chat(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    tokenizer = loaded.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("the feature benchmarks need a model with a chat template")
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def quoting_workload(loaded: LoadedModel, num_prompts: int, max_new_tokens: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        passage = " ".join(rng.sample(_PASSAGES, 2))
        request = f"Here is a passage:\n\n{passage}\n\nQuote the passage back to me exactly, word for word."
        prompts.append(_chat(loaded, [{"role": "user", "content": request}]))
    return Workload(prompts, [max_new_tokens] * num_prompts)


def shared_prefix_workload(loaded: LoadedModel, num_prompts: int, max_new_tokens: int) -> Workload:
    prompts = [
        _chat(
            loaded,
            [
                {"role": "system", "content": _INSTRUCTIONS},
                {"role": "user", "content": _DESK_QUESTIONS[i % len(_DESK_QUESTIONS)]},
            ],
        )
        for i in range(num_prompts)
    ]
    return Workload(prompts, [max_new_tokens] * num_prompts)


def _warm_up(loaded: LoadedModel, workload: Workload, max_batch_size: int) -> None:
    """First passes pay one-off costs (allocator, kernels) that would count against whichever run goes first."""
    run_genserve(loaded, Workload(workload.prompts[:2], [8, 8]), max_batch_size, name="warm-up")


def compare(
    feature: str,
    loaded: LoadedModel,
    workload: Workload,
    max_batch_size: int,
    engine_options: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    plain_options: dict[str, Any] | None = None,
) -> FeatureComparison:
    """The workload through plain genserve (`plain_options`), then with the feature on (engine options or request
    overrides)."""
    _warm_up(loaded, workload, max_batch_size)
    plain = run_genserve(loaded, workload, max_batch_size, name="genserve", engine_options=plain_options)
    enabled = run_genserve(
        loaded, workload, max_batch_size, f"genserve + {feature}", engine_options=engine_options, overrides=overrides
    )
    return FeatureComparison(feature, plain, enabled)


def format_feature_report(comparison: FeatureComparison, workload: Workload) -> str:
    plain, enabled = comparison.plain, comparison.enabled
    counters = enabled.counters
    lines = [
        f"### {comparison.feature}",
        "| run | tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|",
    ]
    for result in (plain, enabled):
        lines.append(
            f"| {result.name} | {result.generated_tokens} | {result.seconds:.1f} | {result.tokens_per_second:.1f} |"
        )
    lines.append(f"wall-time speed-up: {plain.seconds / enabled.seconds:.2f}x")
    if comparison.feature == "prompt lookup" and counters is not None and counters.speculated:
        lines.append(
            f"acceptance: {counters.accepted}/{counters.speculated} proposed tokens "
            f"({counters.accepted / counters.speculated:.0%}); tokens/s ratio "
            f"{enabled.tokens_per_second / plain.tokens_per_second:.2f}x"
        )
    if comparison.feature == "prefix caching" and counters is not None:
        prompt_tokens = sum(map(len, workload.prompts))
        computed = counters.prefix_queried - counters.prefix_hits
        lines.append(
            f"prompt tokens computed: {prompt_tokens} without the cache, {computed} with it "
            f"({prompt_tokens / max(computed, 1):.2f}x less prefill; {counters.prefix_hits} tokens from the cache)"
        )
        ttft = [statistics.mean(result.first_token_seconds) for result in (plain, enabled)]
        lines.append(
            f"mean time to first token: {ttft[0]:.2f} s without, {ttft[1]:.2f} s with ({ttft[0] / ttft[1]:.2f}x)"
        )
    lines.append(f"outputs identical to plain genserve: {comparison.identical}/{len(workload.prompts)}")
    return "\n".join(lines)
