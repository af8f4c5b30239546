"""The static-shape decode path (what a GPU replays from CUDA graphs), run eagerly on CPU: same tokens."""

from __future__ import annotations

import pytest

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.engine.loop import Engine
from tests.conftest import StepDriver, hf_generate

QUOTE = [40, 41, 42, 43, 44, 45]


def _schedule() -> dict[int, list[tuple[str, list[int], dict]]]:
    """Rows joining and leaving so the batch crosses bucket sizes (1, 2, 4, 8) and length buckets (64, 128)."""
    schedule: dict[int, list[tuple[str, list[int], dict]]] = {}
    for i in range(7):
        prompt = [5 + i, 6, 7] * (1 + 9 * (i % 3))  # 3 to 84 tokens: reads cross the 64-position bucket
        overrides: dict = dict(max_new_tokens=20 + 7 * i)
        if i == 2:
            overrides.update(do_sample=True, seed=4, top_k=10)
        if i == 4:
            overrides.update(guidance_scale=1.5)
        if i == 5:
            overrides.update(prompt_lookup_num_tokens=3)  # speculative steps decode eagerly, the others static
        schedule.setdefault(3 * i, []).append((f"r{i}", prompt, overrides))
    schedule[40] = [("late", QUOTE, dict(max_new_tokens=30))]
    return schedule


def test_static_decode_gives_the_eager_tokens_with_rows_joining(tiny) -> None:
    static = StepDriver(tiny, decode_mode="static", max_running=8)
    eager = StepDriver(tiny, decode_mode="eager", max_running=8)
    static.run(_schedule())
    eager.run(_schedule())
    assert static.tokens == eager.tokens and len(static.tokens) == 8
    assert static.finish == eager.finish
    params = eager.engine.make_parameters(max_new_tokens=30)
    assert static.tokens["late"] == hf_generate(tiny.model, QUOTE, params)
    decoder = static.engine.runner.static_decoder
    used = set(decoder._buckets)
    assert {batch for batch, _ in used} >= {1, 2, 4} and {length for _, length in used} >= {64, 128}
    assert all(bucket.graph is None for bucket in decoder._buckets.values())  # no capture on CPU
    assert eager.engine.runner.static_decoder is None


def test_auto_mode_is_eager_on_cpu_and_bad_modes_are_refused(tiny) -> None:
    assert Engine(tiny, EngineConfig(max_running=2)).runner.static_decoder is None
    with pytest.raises(ValueError, match="decode_mode"):
        EngineConfig(max_running=2, decode_mode="graphs")
