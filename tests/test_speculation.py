"""Speculative decoding: greedy outputs with speculation equal plain greedy decoding, token for token."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.params import ValidationError
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.features.speculation import Drafts, accepted_counts, prompt_lookup
from genserve.scheduler.model.loader import LoadedModel
from tests.conftest import TINY_EOS, StepDriver, hf_generate, tiny_model
from tests.serving import ServerThread, ids_request, scrape

QUOTE = [40, 41, 42, 43, 44, 45, 46, 47]


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence() -> None:
    history = torch.tensor(
        [
            [5, 6, 7, 8, 9, 5, 6, 7, 0, 0],  # "5 6 7" occurred before: propose "8 9 5"
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 0],  # no earlier occurrence of any n-gram: nothing
            [3, 9, 9, 3, 8, 8, 3, 0, 0, 0],  # only the 1-gram "3" recurs, latest at 3: propose "8 8 3"
        ]
    )
    drafts = prompt_lookup(history, torch.tensor([8, 9, 7]), wanted=torch.tensor([3, 3, 5]), width=5)
    assert drafts.counts.tolist() == [3, 0, 3]
    assert drafts.tokens[0, :3].tolist() == [8, 9, 5] and drafts.tokens[2, :3].tolist() == [8, 8, 3]


def test_accepted_counts_stop_at_the_first_disagreement() -> None:
    drafts = Drafts(torch.tensor([[1, 2, 3], [1, 2, 3], [4, 4, 4]]), torch.tensor([3, 2, 0]))
    picks = torch.tensor([[1, 2, 3, 9], [1, 5, 3, 9], [4, 4, 4, 4]])
    assert accepted_counts(drafts, picks).tolist() == [3, 1, 0]


def _schedule(lookup: int) -> dict[int, list[tuple[str, list[int], dict]]]:
    """Repetitive prompts (a quote given twice) joining at different steps, next to rows that cannot speculate."""
    spec = dict(prompt_lookup_num_tokens=lookup) if lookup else {}
    return {
        0: [
            ("quote", [3] + QUOTE + [9] + QUOTE[:3], dict(max_new_tokens=40, **spec)),
            ("plain", [7, 8, 9], dict(max_new_tokens=30)),
        ],
        2: [("short", QUOTE * 2, dict(max_new_tokens=5, **spec))],
        4: [
            ("banned", QUOTE + QUOTE[:2], dict(max_new_tokens=25, bad_words_ids=[[QUOTE[4]]], **spec)),
            ("sampled", [11, 12, 13], dict(max_new_tokens=20, do_sample=True, seed=3, **spec)),
        ],
        5: [("penalised", QUOTE + QUOTE[:4], dict(max_new_tokens=20, repetition_penalty=1.2, **spec))],
        9: [("biased", [20] + QUOTE * 2, dict(max_new_tokens=33, logit_bias={QUOTE[2]: -3.0}, **spec))],
    }


def test_speculative_greedy_equals_plain_greedy_with_rows_joining(tiny) -> None:
    speculative, plain = StepDriver(tiny, max_running=8), StepDriver(tiny, max_running=8)
    speculative.run(_schedule(lookup=6))
    plain.run(_schedule(lookup=0))
    assert speculative.tokens == plain.tokens
    assert speculative.finish == plain.finish
    runner = speculative.engine.runner
    assert runner.accepted_tokens > 10 and runner.speculated_tokens >= runner.accepted_tokens
    prompt, overrides = _schedule(0)[0][0][1:]
    assert plain.tokens["quote"] == hf_generate(tiny.model, prompt, plain.engine.make_parameters(**overrides))


def test_speculation_saves_steps_and_respects_eos_and_length(tiny) -> None:
    prompt = QUOTE * 3
    for max_new_tokens in (1, 2, 7, 23):
        speculative, plain = StepDriver(tiny, max_running=2), StepDriver(tiny, max_running=2)
        speculative.submit("r", prompt, max_new_tokens=max_new_tokens, prompt_lookup_num_tokens=8)
        plain.submit("r", prompt, max_new_tokens=max_new_tokens)
        steps = 0
        while speculative.engine.step():
            steps += 1
        plain.run()
        assert speculative.tokens["r"] == plain.tokens["r"] and len(plain.tokens["r"]) <= max_new_tokens
        assert speculative.finish == plain.finish
    assert steps < max_new_tokens  # the last case took fewer forward passes than tokens


def test_speculation_stops_at_eos_inside_an_accepted_run(tiny) -> None:
    """eos as a proposed-and-accepted token must end the row there, with nothing after it."""
    plain = StepDriver(tiny, max_running=2)
    prompt = QUOTE * 2
    plain.submit("r", prompt, max_new_tokens=30)
    plain.run()
    reference = plain.tokens["r"]
    eos = reference[5]  # pretend a token the model produces is eos: the output must end at its first occurrence
    speculative, plain = StepDriver(tiny, max_running=2), StepDriver(tiny, max_running=2)
    speculative.submit("r", prompt, max_new_tokens=30, eos_token_id=[eos, TINY_EOS], prompt_lookup_num_tokens=8)
    plain.submit("r", prompt, max_new_tokens=30, eos_token_id=[eos, TINY_EOS])
    speculative.run()
    plain.run()
    assert speculative.tokens["r"] == plain.tokens["r"] == reference[: reference.index(eos) + 1]


def test_assistant_model_speculation_equals_plain_greedy(tiny) -> None:
    """The model as its own assistant (every proposal right) and an unrelated one (most wrong): same tokens."""
    plain = StepDriver(tiny, max_running=8)
    plain.run(_schedule(lookup=0))
    for assistant, accepts_most in ((tiny, True), (LoadedModel(tiny_model(seed=1), None, "other"), False)):
        speculative = StepDriver(tiny, assistant=assistant, num_assistant_tokens=4, max_running=8)
        speculative.run(_schedule(lookup=0))
        assert speculative.tokens == plain.tokens
        assert speculative.finish == plain.finish
        runner = speculative.engine.runner
        rate = runner.accepted_tokens / runner.speculated_tokens
        assert rate > 0.9 if accepts_most else rate < 0.5, rate


def test_assistant_and_prompt_lookup_rows_mix(tiny) -> None:
    plain = StepDriver(tiny, max_running=8)
    plain.run(_schedule(lookup=0))
    mixed = StepDriver(tiny, assistant=tiny, num_assistant_tokens=3, max_running=8)
    schedule = _schedule(lookup=5)
    schedule[0][1][2]["num_assistant_tokens"] = 0  # "plain" opts out; the lookup rows use lookup
    mixed.run(schedule)
    assert mixed.tokens == plain.tokens


def test_an_assistant_needs_the_same_vocabulary(tiny) -> None:
    other = LoadedModel(
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            )
        ),
        None,
        "x",
    )
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(tiny, EngineConfig(max_running=2), assistant=other)
    driver = StepDriver(tiny, max_running=2)
    with pytest.raises(ValidationError, match="num_assistant_tokens"):
        driver.submit("r", [5, 6], max_new_tokens=3, num_assistant_tokens=2)


def test_speculation_over_grpc_with_stop_strings_and_metrics(tiny_with_tokenizer) -> None:
    server = ServerThread(tiny_with_tokenizer, metrics=True, max_running=6)
    try:
        prompt = list(tiny_with_tokenizer.tokenizer.encode("abcabcabcabcabc"))
        plain = server.stub.Generate(ids_request(prompt, max_new_tokens=40))
        text = plain.text
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        futures = [
            server.stub.Generate.future(ids_request(prompt, max_new_tokens=40)),  # a plain batch-mate
            server.stub.Generate.future(ids_request(prompt, max_new_tokens=40, prompt_lookup_num_tokens=6)),
            server.stub.Generate.future(
                ids_request(prompt, max_new_tokens=40, prompt_lookup_num_tokens=6, stop_strings=[stop])
            ),
        ]
        again, speculative, stopped = (future.result(timeout=60) for future in futures)
        assert speculative.text == again.text == text and list(speculative.token_ids) == list(plain.token_ids)
        assert stopped.text == text[: text.index(stop)] and stopped.stop_string == stop
        streamed = "".join(
            chunk.text
            for chunk in server.stub.GenerateStream(ids_request(prompt, max_new_tokens=40, prompt_lookup_num_tokens=6))
        )
        assert streamed == text
        values = scrape(server)
        accepted = values["genserve_speculative_accepted_tokens_total"]
        assert values["genserve_speculative_proposed_tokens_total"] >= accepted > 0
    finally:
        server.close()


def test_feature_comparison_counts_speculation_and_identical_outputs(tiny) -> None:
    from genserve.scheduler.benchmarks.features import compare, format_feature_report
    from genserve.scheduler.benchmarks.throughput import Workload

    workload = Workload([QUOTE * 3, [5, 6, 7] * 4, [9, 10]], [20, 15, 10])
    comparison = compare("prompt lookup", tiny, workload, 2, overrides=dict(prompt_lookup_num_tokens=4))
    assert comparison.identical == 3
    assert len(comparison.plain.first_token_seconds) == 3 and min(comparison.plain.first_token_seconds) > 0
    counters = comparison.enabled.counters
    assert counters.speculated >= counters.accepted > 0
    report = format_feature_report(comparison, workload)
    assert "outputs identical to plain genserve: 3/3" in report and "acceptance:" in report


def test_preempted_speculating_and_guided_rows_resume_exactly(tiny) -> None:
    """Batch rows (one speculating with an assistant, one guided) yield to interactive ones, are recomputed
    on readmission, and still end with exactly the tokens of an undisturbed run."""
    from genserve.scheduler.core.request import Priority, RequestOptions

    preempted: list[int] = []

    def run(preempt: bool) -> dict[str, list[int]]:
        driver = StepDriver(tiny, assistant=tiny, num_assistant_tokens=3, max_running=4)
        engine = driver.engine
        engine.on_step = lambda stats: preempted.append(stats.num_preempted)
        batch = RequestOptions(priority=Priority.BATCH)
        submissions = [
            ("spec", QUOTE * 2, dict(max_new_tokens=40, prompt_lookup_num_tokens=4)),
            ("draft", [5, 6, 7], dict(max_new_tokens=40)),
            ("guided", [8, 9], dict(max_new_tokens=30, guidance_scale=2.0)),
        ]
        for name, prompt, overrides in submissions:
            engine.submit(prompt, engine.make_parameters(**overrides), replace(batch, request_id=name))
        for step in range(200):
            if preempt and step == 6:
                for index in range(3):
                    driver.submit(f"urgent{index}", [20 + index, 21], max_new_tokens=5)
            if not engine.step() and step > 6:
                break
        return driver.tokens

    disturbed = run(preempt=True)
    assert sum(preempted) >= 2  # the guided request alone frees two rows
    undisturbed = run(preempt=False)
    for name in ("spec", "draft", "guided"):
        assert disturbed[name] == undisturbed[name], name


def test_no_speculation_past_the_batch_size_limit(tiny) -> None:
    limited = StepDriver(tiny, speculation_max_rows=1, max_running=8)
    unlimited = StepDriver(tiny, max_running=8)
    plain = StepDriver(tiny, max_running=8)
    for driver, lookup in ((limited, 6), (unlimited, 6), (plain, 0)):
        driver.run(_schedule(lookup=lookup))
    assert limited.tokens == unlimited.tokens == plain.tokens
    # Limited to one row, the lookup rows speculated only in the steps they decoded alone.
    assert limited.engine.runner.counters().speculated < unlimited.engine.runner.counters().speculated
    lone = StepDriver(tiny, speculation_max_rows=1, max_running=8)
    lone.run({0: [("quote", QUOTE * 3, dict(max_new_tokens=20, prompt_lookup_num_tokens=6))]})
    assert lone.engine.runner.counters().accepted > 0
