"""Chunked prefill: prompts longer than a step's token budget are computed over several steps while the running
rows keep decoding, and every request's tokens still equal `generate()` on it alone."""

from __future__ import annotations

import random

from genserve.scheduler.core.request import Priority, RequestOptions
from tests.conftest import TINY_VOCAB, StepDriver, hf_generate
from tests.test_guidance import hf_guided


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(length)]


def test_long_prompts_are_chunked_between_decode_steps_and_equal_generate(tiny) -> None:
    driver = StepDriver(tiny, max_running=6, max_num_batched_tokens=24)
    steps: list[tuple[int, int]] = []  # (decoding rows, prompt tokens) of every step
    driver.engine.on_step = lambda stats: steps.append((stats.num_rows, stats.num_prefill_tokens))
    requests = {
        "short0": (_prompt(5, 1), 0),
        "short1": (_prompt(9, 2), 0),
        "long0": (_prompt(130, 3), 2),  # 6 chunks
        "long1": (_prompt(75, 4), 3),  # queued behind long0, starts in long0's last step
        "short2": (_prompt(12, 5), 4),
    }
    schedule: dict[int, list] = {}
    for request_id, (prompt, step) in requests.items():
        schedule.setdefault(step, []).append((request_id, prompt, dict(max_new_tokens=40, ignore_eos=True)))
    driver.run(schedule)
    for request_id, (prompt, _) in requests.items():
        expected = hf_generate(tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=40, ignore_eos=True))
        assert driver.tokens[request_id] == expected, request_id
    assert all(num_rows + prompt_tokens <= 24 + 1 for num_rows, prompt_tokens in steps)  # +1: a completed prompt
    chunked = [prompt_tokens for _, prompt_tokens in steps if prompt_tokens]
    assert len(chunked) >= (130 + 75) // 24  # no step computed a long prompt whole
    # The short rows got a token in every step while the long prompts prefilled.
    assert all(num_rows >= 2 for num_rows, _ in steps[2:12])


def test_chunked_prefill_with_guidance_prefix_cache_and_twins(tiny) -> None:
    prompt = _prompt(70, 7)
    cached = StepDriver(tiny, max_running=8, max_num_batched_tokens=20, kv_cache_memory=2**20, prefix_caching=True)
    cached.run(
        {
            0: [("guided", prompt, dict(max_new_tokens=15, guidance_scale=1.5))],
            1: [(f"twin{i}", prompt, dict(max_new_tokens=12)) for i in range(2)],
            9: [("again", prompt, dict(max_new_tokens=12))],  # its prefix now comes from the cache
        }
    )
    assert cached.tokens["guided"] == hf_guided(tiny.model, prompt, 15, 1.5)
    expected = hf_generate(tiny.model, prompt, cached.engine.make_parameters(max_new_tokens=12))
    assert cached.tokens["twin0"] == cached.tokens["twin1"] == cached.tokens["again"] == expected
    assert cached.engine.runner.counters().prefix_hits >= 64


def test_cancel_mid_prefill_frees_its_row_and_preempted_rows_resume_chunked(tiny) -> None:
    driver = StepDriver(tiny, max_running=2, max_num_batched_tokens=16)
    batch = RequestOptions(request_id="batch", priority=Priority.BATCH)
    driver.engine.submit(_prompt(6, 8), driver.engine.make_parameters(max_new_tokens=40, ignore_eos=True), batch)
    for _ in range(20):
        driver.engine.step()
    driver.submit("doomed", _prompt(90, 9), max_new_tokens=5)
    driver.engine.step()
    assert driver.engine.snapshot.num_prefilling == 1
    driver.engine.cancel("doomed")
    driver.engine.step()
    assert driver.engine.runner.num_slots == 1 and driver.engine.snapshot.num_prefilling == 0
    # Two interactive requests need both rows: the batch row (26 tokens by now) yields, and once i0 is done it
    # prefills again beside i1's decoding, in chunks of the step's budget, its generated tokens included.
    plans = []
    schedule = driver.engine.scheduler.schedule

    def recording(now: float):  # noqa: ANN202 - the scheduler's own (plan, events)
        plan, events = schedule(now)
        plans.append(plan)
        return plan, events

    driver.engine.scheduler.schedule = recording
    driver.submit("i0", _prompt(8, 10), max_new_tokens=6)
    driver.submit("i1", _prompt(7, 11), max_new_tokens=30)
    driver.run()
    preempted = [i for i, plan in enumerate(plans) if any(seq.request_id == "batch" for seq in plan.preempted)]
    assert len(preempted) == 1
    chunks = [(c.start, c.end) for plan in plans[preempted[0] :] for c in plan.prefills if c.seq.request_id == "batch"]
    assert len(chunks) >= 2 and chunks[0][0] == 0  # recomputed from its first token, over several steps
    assert all(end == start for (_, end), (start, _) in zip(chunks, chunks[1:]))  # each chunk where the last ended
    assert chunks[-1][1] >= 26  # its generated tokens recomputed too
    assert driver.tokens["i1"] == hf_generate(
        tiny.model, _prompt(7, 11), driver.engine.make_parameters(max_new_tokens=30)
    )
    expected = hf_generate(tiny.model, _prompt(6, 8), driver.engine.make_parameters(max_new_tokens=40, ignore_eos=True))
    assert driver.tokens["batch"] == expected
    assert driver.tokens["doomed"] == [] and len(driver.tokens["i0"]) == 6
    assert driver.engine.runner.num_slots == 0 and driver.engine.runner.kv_usage_ratio() == 0.0
