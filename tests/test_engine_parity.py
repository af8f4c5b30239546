"""Greedy outputs served concurrently equal `model.generate()` on each request alone, token for token.

Requests of different lengths join at staggered steps, with different parameters in the same batch.
"""

from __future__ import annotations

import random

import pytest

from genserve.scheduler.core.request import FinishReason
from tests.conftest import TINY_EOS, TINY_VOCAB, StepDriver, hf_generate

MIXED_PARAMETERS: list[dict] = [
    {"max_new_tokens": 40},
    {"max_new_tokens": 24, "repetition_penalty": 1.3},
    {"max_new_tokens": 30, "repetition_penalty": 0.8},
    {"max_new_tokens": 32, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 28, "no_repeat_ngram_size": 3, "repetition_penalty": 1.1},
    {"max_new_tokens": 20, "min_new_tokens": 15},
    {"max_new_tokens": 25, "bad_words_ids": [[5], [7, 8], [9, 10, 11]]},
    {"max_new_tokens": 36, "eos_token_id": [TINY_EOS, 3, 17, 33]},
    {"max_new_tokens": 1},
    {"max_new_tokens": 45, "min_new_tokens": 3, "bad_words_ids": [[3, 4]], "eos_token_id": [TINY_EOS, 6]},
]


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 60))] for _ in range(count)]


def test_staggered_mixed_batch_equals_generate_alone(tiny) -> None:
    driver = StepDriver(tiny, max_running=6)
    prompts = _prompts(len(MIXED_PARAMETERS) * 2, seed=1)
    schedule: dict[int, list] = {}
    for i, prompt in enumerate(prompts):
        schedule.setdefault((i * 3) % 17, []).append((f"r{i}", prompt, MIXED_PARAMETERS[i % len(MIXED_PARAMETERS)]))
    driver.run(schedule)
    for i, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(**MIXED_PARAMETERS[i % len(MIXED_PARAMETERS)])
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompt, params), f"request r{i} {params}"
    assert driver.engine.num_running == 0


def test_eos_with_several_ids_reports_eos_and_stops(tiny) -> None:
    driver = StepDriver(tiny, max_running=4)
    prompt = _prompts(1, seed=5)[0]
    free_run = hf_generate(
        tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=30, eos_token_id=[TINY_EOS])
    )
    stop_token = free_run[10]  # make the 11th generated token an eos id
    driver.submit("r", prompt, max_new_tokens=30, eos_token_id=[TINY_EOS, stop_token])
    driver.run()
    assert driver.tokens["r"] == free_run[: free_run.index(stop_token) + 1]
    assert driver.finish["r"] is FinishReason.EOS_TOKEN


def test_length_finish_reason_and_ignore_eos(tiny) -> None:
    driver = StepDriver(tiny, max_running=4)
    prompt = _prompts(1, seed=6)[0]
    everything_is_eos = list(range(TINY_VOCAB))
    driver.submit("eos", prompt, max_new_tokens=10, eos_token_id=everything_is_eos)
    driver.submit("ignored", prompt, max_new_tokens=10, eos_token_id=everything_is_eos, ignore_eos=True)
    driver.run()
    assert len(driver.tokens["eos"]) == 1 and driver.finish["eos"] is FinishReason.EOS_TOKEN
    assert len(driver.tokens["ignored"]) == 10 and driver.finish["ignored"] is FinishReason.LENGTH


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.7, "top_k": 20},
        {"top_p": 0.8, "min_p": 0.05},
        {"typical_p": 0.9},
        {"epsilon_cutoff": 0.003, "top_k": 0},
        {"eta_cutoff": 0.01, "temperature": 1.2},
        {"top_h": 0.5, "top_k": 0},
    ],
)
def test_seeded_sampling_is_independent_of_batch_mates(tiny, sampling: dict) -> None:
    prompt = _prompts(1, seed=7)[0]
    request = {"max_new_tokens": 30, "do_sample": True, "seed": 1234, **sampling}
    alone = StepDriver(tiny, max_running=8)
    alone.submit("seeded", prompt, **request)
    alone.run()
    crowded = StepDriver(tiny, max_running=8)
    others = _prompts(7, seed=8)
    schedule = {
        0: [
            (f"o{i}", p, {"max_new_tokens": 25, "do_sample": True, "temperature": 1.5})
            for i, p in enumerate(others[:4])
        ]
    }
    schedule[2] = [("seeded", prompt, request)]
    schedule[4] = [(f"g{i}", p, {"max_new_tokens": 12}) for i, p in enumerate(others[4:])]
    crowded.run(schedule)
    assert crowded.tokens["seeded"] == alone.tokens["seeded"]
    # Same draws as generate() after torch.manual_seed(seed): one multinomial per step from the request's own stream.
    assert alone.tokens["seeded"] == hf_generate(tiny.model, prompt, alone.engine.make_parameters(**request))


def test_different_seeds_give_different_samples(tiny) -> None:
    driver = StepDriver(tiny, max_running=4)
    prompt = _prompts(1, seed=9)[0]
    for seed in (1, 2):
        driver.submit(f"s{seed}", prompt, max_new_tokens=20, do_sample=True, temperature=1.5, seed=seed)
    driver.run()
    assert driver.tokens["s1"] != driver.tokens["s2"]


def test_temperature_zero_is_greedy(tiny) -> None:
    driver = StepDriver(tiny, max_running=4)
    prompt = _prompts(1, seed=10)[0]
    driver.submit("t0", prompt, max_new_tokens=15, do_sample=True, temperature=0.0)
    driver.run()
    assert driver.tokens["t0"] == hf_generate(tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=15))


def test_cancel_frees_row_within_one_step_and_batch_keeps_serving(tiny) -> None:
    driver = StepDriver(tiny, max_running=4)
    prompts = _prompts(3, seed=11)
    for i, prompt in enumerate(prompts):
        driver.submit(f"r{i}", prompt, max_new_tokens=40, ignore_eos=True)
    for _ in range(5):
        driver.engine.step()
    assert driver.engine.num_running == 3
    driver.engine.cancel("r1")
    driver.engine.step()
    assert driver.engine.num_running == 2
    assert driver.finish["r1"] is FinishReason.CANCELLED
    assert len(driver.tokens["r1"]) == 5
    driver.run()
    for i in (0, 2):
        params = driver.engine.make_parameters(max_new_tokens=40, ignore_eos=True)
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompts[i], params)[:40]
        assert driver.finish[f"r{i}"] is FinishReason.LENGTH


def test_cancel_while_queued_never_runs(tiny) -> None:
    driver = StepDriver(tiny, max_running=1)
    driver.submit("running", [5, 6, 7], max_new_tokens=10)
    driver.submit("queued", [8, 9], max_new_tokens=10)
    driver.engine.step()
    driver.engine.cancel("queued")
    driver.run()
    assert driver.tokens["queued"] == [] and driver.finish["queued"] is FinishReason.CANCELLED
    assert len(driver.tokens["running"]) >= 1


def test_max_time_ends_with_time_limit(tiny) -> None:
    driver = StepDriver(tiny, max_running=2)
    driver.submit("slow", [5, 6, 7], max_new_tokens=500, ignore_eos=True, max_time=0.05)
    driver.run()
    assert driver.finish["slow"] is FinishReason.TIME_LIMIT
    assert 1 <= len(driver.tokens["slow"]) < 500


def test_rows_leaving_and_joining_reuse_slots(tiny) -> None:
    """Many more requests than rows: every slot is reused many times and outputs stay exact."""
    driver = StepDriver(tiny, max_running=3)
    prompts = _prompts(12, seed=12)
    for i, prompt in enumerate(prompts):
        driver.submit(f"r{i}", prompt, max_new_tokens=5 + (i * 7) % 23)
    driver.run()
    for i, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(max_new_tokens=5 + (i * 7) % 23)
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompt, params)


def test_prompts_admitted_together_prefill_in_one_padded_pass_and_equal_generate(tiny, monkeypatch) -> None:
    """Similar lengths share one right-padded forward; a much longer prompt gets its own; tokens stay exact. (The
    eager step's prefill: the compiled one computes prompts in one flat pass, test_compiled_step.py.)"""
    driver = StepDriver(tiny, max_running=8, decode_mode="auto")
    decoder = driver.engine.runner.model.get_decoder()
    original, prefill_shapes = decoder.forward, []

    def counting(input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if input_ids.shape[1] > 1:
            prefill_shapes.append(tuple(input_ids.shape))
        return original(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(decoder, "forward", counting)
    rng = random.Random(21)
    prompts = [[rng.randrange(3, TINY_VOCAB) for _ in range(length)] for length in (30, 33, 28, 31, 90)]
    for i, prompt in enumerate(prompts):
        driver.submit(f"r{i}", prompt, max_new_tokens=20, ignore_eos=True)
    driver.run()
    assert sorted(prefill_shapes) == [(1, 90), (4, 33)]
    for i, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(max_new_tokens=20, ignore_eos=True)
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompt, params), f"r{i}"
