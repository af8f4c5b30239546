"""The real default model (SmolLM2-135M-Instruct) served through the threaded engine and its asyncio API."""

from __future__ import annotations

import asyncio

import pytest

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import FinishReason
from genserve.scheduler.engine.async_engine import AsyncEngine, GenerationOutput
from genserve.scheduler.engine.detokenizer import IncrementalDetokenizer
from genserve.scheduler.engine.loop import Engine
from tests.conftest import StepDriver, hf_generate

pytestmark = pytest.mark.default_model

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for sleeping better, with a sentence of explanation for each tip.",
    "List three prime numbers.",
    "Explain gravity to a child.",
    "Why do cats purr? Answer in one paragraph.",
    "Describe the color blue to someone who cannot see.",
]
PARAMETERS = [
    {"max_new_tokens": 40},
    {"max_new_tokens": 36, "repetition_penalty": 1.3},
    {"max_new_tokens": 40, "no_repeat_ngram_size": 2},
    {"max_new_tokens": 30, "min_new_tokens": 25},
    {"max_new_tokens": 32, "bad_words_ids": [[330], [28, 216]]},
    {"max_new_tokens": 40, "eos_token_id": [2, 30]},  # 30 is "?"-ish punctuation: a second eos id
    {"max_new_tokens": 12},
]


async def _collect(engine: AsyncEngine, prompt: list[int], params, delay: float) -> list[GenerationOutput]:
    await asyncio.sleep(delay)
    return [out async for out in engine.generate(prompt, params)]


def _serve(loaded, jobs, max_running: int = 4) -> list[list[GenerationOutput]]:
    async def main() -> list[list[GenerationOutput]]:
        engine = AsyncEngine(Engine(loaded, EngineConfig(max_running=max_running)))
        engine.start()
        try:
            return await asyncio.gather(*[_collect(engine, p, params, delay) for p, params, delay in jobs])
        finally:
            engine.stop()

    return asyncio.run(main())


def _chat(loaded, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])


def test_concurrent_mixed_requests_equal_generate(default_model) -> None:
    engine = Engine(default_model)
    jobs = []
    for i, (question, overrides) in enumerate(zip(QUESTIONS, PARAMETERS)):
        jobs.append((_chat(default_model, question), engine.make_parameters(**overrides), 0.15 * i))
    results = _serve(default_model, jobs)
    for (prompt, params, _), outputs in zip(jobs, results):
        tokens = [t for out in outputs for t in out.token_ids]
        assert tokens == hf_generate(default_model.model, prompt, params), params
        text = "".join(out.text for out in outputs)
        assert text == default_model.tokenizer.decode(tokens, skip_special_tokens=True)
        assert outputs[-1].finish_reason in (FinishReason.EOS_TOKEN, FinishReason.LENGTH)
        assert outputs[-1].num_generated_tokens == len(tokens)


def test_chinese_and_emoji_stream_is_valid_and_joins_to_full_text(default_model) -> None:
    engine = Engine(default_model)
    prompt = _chat(default_model, "请用中文介绍一下你自己，并在每句话后面加一个表情符号 😀🎉")
    params = engine.make_parameters(max_new_tokens=60, do_sample=True, temperature=1.0, seed=3)
    outputs = _serve(default_model, [(prompt, params, 0.0)])[0]
    tokens = [t for out in outputs for t in out.token_ids]
    deltas = [out.text for out in outputs]
    full = default_model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(deltas) == full
    assert all("\ufffd" not in delta for delta in deltas)  # no half characters
    assert any(ord(ch) > 0x2E80 for ch in full), "the sample should contain CJK or emoji to test anything"
    byte_level_splits = [t for t in tokens if "\ufffd" in default_model.tokenizer.decode([t])]
    assert byte_level_splits, "some character must span several tokens for this test to bite"


def test_stop_string_ends_text_before_it_and_never_leaks(default_model) -> None:
    engine = Engine(default_model)
    prompt = _chat(default_model, QUESTIONS[2])
    free = _serve(default_model, [(prompt, engine.make_parameters(max_new_tokens=60), 0.0)])[0]
    full_text = "".join(out.text for out in free)
    stop = full_text[25:31]  # a stop string from the middle of the answer, likely spanning tokens
    params = engine.make_parameters(max_new_tokens=60, stop_strings=[stop, "zzzzqqq"])
    outputs = _serve(default_model, [(prompt, params, 0.0)])[0]
    text = "".join(out.text for out in outputs)
    assert text == full_text[: full_text.index(stop)]
    assert outputs[-1].finish_reason is FinishReason.STOP_STRING and outputs[-1].stop_string == stop
    streamed = ""
    for out in outputs:
        streamed += out.text
        assert full_text.startswith(streamed) and stop not in streamed


def test_detokenizer_holds_back_a_possible_stop_string(default_model) -> None:
    tokenizer = default_model.tokenizer
    ids = tokenizer.encode("The answer is forty-two, my friend.")
    detokenizer = IncrementalDetokenizer(tokenizer, stop_strings=("forty-two",))
    emitted, hit = "", None
    for token_id in ids:
        delta = detokenizer.push(token_id)
        emitted += delta.text
        assert "forty" not in emitted
        if delta.stop_string:
            hit = delta.stop_string
            break
    assert hit == "forty-two" and emitted == "The answer is "


def test_a_long_prompt_prefills_in_chunks_while_streams_decode_and_equals_generate(default_model) -> None:
    from genserve.scheduler.benchmarks.long_prompt import long_prompt
    from tests.conftest import StepDriver

    driver = StepDriver(default_model, max_running=8)  # the default budget: 384 tokens per step
    steps: list[tuple[int, int]] = []
    driver.engine.on_step = lambda stats: steps.append((stats.num_rows, stats.num_prefill_tokens))
    prompt = long_prompt(default_model, 1500)
    streams = {f"s{i}": _chat(default_model, question) for i, question in enumerate(QUESTIONS[:4])}
    schedule = {0: [(name, ids, dict(max_new_tokens=24)) for name, ids in streams.items()]}
    schedule[2] = [("long", prompt, dict(max_new_tokens=16))]
    driver.run(schedule)
    for name, ids in {**streams, "long": prompt}.items():
        budget = 16 if name == "long" else 24
        assert driver.tokens[name] == hf_generate(
            default_model.model, ids, driver.engine.make_parameters(max_new_tokens=budget)
        ), name
    chunk_steps = [(rows, tokens) for rows, tokens in steps[2:] if tokens]
    assert len(chunk_steps) >= 3 and all(tokens <= 384 for _, tokens in chunk_steps)
    assert all(rows >= 1 for rows, _ in chunk_steps)  # the streams got tokens while it prefilled


def test_a_9000_token_prompt_decodes_beside_short_ones_in_a_768mib_paged_cache(default_model) -> None:
    """At --max-context 12288 a slot per row holds 12,288 x 46 KB = 566 MB: 768 MiB buys one row. The paged cache
    serves a 9,000-token prompt next to three chat requests in that budget, all equal to generate() (past the
    model's 8,192 trained positions, where generate() goes as well)."""
    from genserve.scheduler.benchmarks.long_prompt import long_prompt
    from tests.conftest import StepDriver

    long_tokens = 9000
    driver = StepDriver(default_model, max_running=8, max_context=12288, kv_cache_memory=768 * 2**20)
    prompt = long_prompt(default_model, long_tokens)
    streams = {f"s{i}": _chat(default_model, question) for i, question in enumerate(QUESTIONS[:3])}
    schedule = {0: [(name, ids, dict(max_new_tokens=24)) for name, ids in streams.items()]}
    schedule[2] = [("long", prompt, dict(max_new_tokens=16))]
    driver.run(schedule)
    pool = driver.engine.scheduler.blocks
    assert len(prompt) >= long_tokens and pool.num_blocks * pool.block_size < 2 * long_tokens  # room for one only
    for name, ids in {**streams, "long": prompt}.items():
        budget = 16 if name == "long" else 24
        assert driver.tokens[name] == hf_generate(
            default_model.model, ids, driver.engine.make_parameters(max_new_tokens=budget)
        ), name


def test_a_shared_system_prompt_is_computed_once_and_every_answer_equals_generate(default_model) -> None:
    """`genserve serve`'s KV defaults (a paged pool of the CPU default size, prefix caching on): a ~700-token system
    prompt, then eight different questions at once. The first computes the prompt; the others find its blocks
    and, the pool being roomy, copy them into their homes, so that every decode step reads all eight rows in
    place; each greedy answer equals generate() alone; another salt finds nothing."""
    from genserve.scheduler.benchmarks.features import _INSTRUCTIONS
    from genserve.service.cli.flags import AUTO_KV_CACHE_MEMORY

    system = _INSTRUCTIONS * 3
    prompts = []
    for question in [*QUESTIONS, "What is the tallest mountain on Earth?"]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        prompts.append(
            list(default_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        )
    shared = next(i for i in range(min(map(len, prompts))) if len({prompt[i] for prompt in prompts}) > 1)
    assert 650 <= shared <= 800
    driver = StepDriver(default_model, max_running=8, kv_cache_memory=AUTO_KV_CACHE_MEMORY["cpu"], prefix_caching=True)
    for i, prompt in enumerate(prompts):
        driver.submit(f"q{i}", prompt, max_new_tokens=16)
    pool, scheduler = driver.engine.scheduler.blocks, driver.engine.scheduler
    shared_blocks = shared // pool.block_size
    copies_at_peak = None
    while driver.engine.step():
        if len(scheduler.running) == 8 and copies_at_peak is None:
            copies_at_peak = {tuple(pool.table(seq)[:shared_blocks]) for seq in scheduler.running}
            assert all(pool.is_home(seq) for seq in scheduler.running)
    assert copies_at_peak is not None and len(copies_at_peak) == 8  # one copy of the prefix per row, at home
    assert driver.engine.runner.counters().prefix_hits >= 0.8 * 8 * shared
    params = driver.engine.make_parameters(max_new_tokens=16)
    for i, prompt in enumerate(prompts):
        assert driver.tokens[f"q{i}"] == hf_generate(default_model.model, prompt, params), f"q{i}"
    before = driver.engine.runner.counters().prefix_hits
    driver.run({0: [("other-tenant", prompts[0], dict(max_new_tokens=4, options=dict(cache_salt="tenant-b")))]})
    assert driver.engine.runner.counters().prefix_hits == before
