"""Prefix caching: requests sharing a prompt prefix reuse its KV, and their outputs equal uncached ones."""

from __future__ import annotations

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import StepDriver, hf_generate
from tests.serving import ServerThread, ids_request, scrape

SYSTEM = list(range(100, 148))  # a 48-token shared prefix: three 16-token blocks


def _requests(count: int) -> dict[int, list[tuple[str, list[int], dict]]]:
    """Requests that share SYSTEM and differ after it, arriving every few steps, greedy and sampled."""
    schedule: dict[int, list[tuple[str, list[int], dict]]] = {}
    for i in range(count):
        overrides = dict(max_new_tokens=12 + i)
        if i % 3 == 2:
            overrides.update(do_sample=True, seed=i, top_k=30)
        schedule.setdefault(2 * i, []).append((f"r{i}", SYSTEM + [10 + i, 20 + i * 3, 7], overrides))
    return schedule


def test_prefix_cached_outputs_equal_uncached_and_hits_are_counted(tiny) -> None:
    cached = StepDriver(tiny, prefix_cache_tokens=256, max_running=4)
    plain = StepDriver(tiny, max_running=4)
    cached.run(_requests(8))
    plain.run(_requests(8))
    assert cached.tokens == plain.tokens and len(cached.tokens) == 8
    counters = cached.engine.runner.counters()
    assert counters.prefix_queried == 8 * (len(SYSTEM) + 3)
    assert counters.prefix_hits == 7 * len(SYSTEM)  # every request after the first finds the three system blocks
    params = plain.engine.make_parameters(max_new_tokens=12)
    assert cached.tokens["r0"] == hf_generate(tiny.model, SYSTEM + [10, 20, 7], params)


def test_a_tiny_pool_evicts_and_stays_correct(tiny) -> None:
    """Six different 40-token prompts (two full blocks each) pass through a pool of two blocks, then the first
    prompt comes again: its blocks were evicted, so it finds nothing; a roomy pool serves it both blocks."""
    schedule = {i: [(f"p{i}", [(7 * i + j) % 300 + 3 for j in range(40)], dict(max_new_tokens=6))] for i in range(6)}
    schedule[8] = [("again", schedule[0][0][1], dict(max_new_tokens=6))]
    tiny_pool = StepDriver(tiny, prefix_cache_tokens=32, max_running=3)
    roomy = StepDriver(tiny, prefix_cache_tokens=1024, max_running=3)
    plain = StepDriver(tiny, max_running=3)
    for driver in (tiny_pool, roomy, plain):
        driver.run(dict(schedule))
    assert tiny_pool.tokens == plain.tokens == roomy.tokens
    assert tiny_pool.engine.runner.prefix_cache.evicted_blocks >= 10  # 12 distinct blocks through 2 places
    assert tiny_pool.engine.runner.counters().prefix_hits == 0
    assert roomy.engine.runner.prefix_cache.evicted_blocks == 0
    assert roomy.engine.runner.counters().prefix_hits == 32  # "again" found its two blocks


def test_prefix_cache_hits_reach_the_metrics(tiny) -> None:
    server = ServerThread(tiny, metrics=True, prefix_cache_tokens=256, max_running=4)
    try:
        server.stub.Generate(ids_request(SYSTEM + [3], max_new_tokens=3))  # fills the cache
        prompts = [SYSTEM + [i + 4] for i in range(2)] + [[7, 8, 9]]  # two hits, one plain request beside them
        futures = [server.stub.Generate.future(ids_request(prompt, max_new_tokens=10)) for prompt in prompts]
        params = server.engine.make_parameters(max_new_tokens=10)
        for prompt, future in zip(prompts, futures):
            assert list(future.result(timeout=60).token_ids) == hf_generate(tiny.model, prompt, params)
        values = scrape(server)
        assert server.stub.ModelInfo(pb.ModelInfoRequest()).prefix_caching
        assert values["genserve_prefix_cache_hits_total"] == 2 * len(SYSTEM)
        # The warm-up request is looked up too.
        assert values["genserve_prefix_cache_queries_total"] >= 3 * (len(SYSTEM) + 1) + 3
    finally:
        server.close()


def test_the_next_chat_turn_reuses_the_previous_answer(tiny) -> None:
    first_prompt = list(range(60, 100))
    cached = StepDriver(tiny, prefix_cache_tokens=512, max_running=2)
    cached.run({0: [("turn1", first_prompt, dict(max_new_tokens=30, ignore_eos=True))]})
    second_prompt = first_prompt + cached.tokens["turn1"] + [5, 6, 7]
    before = cached.engine.runner.counters()
    cached.run({0: [("turn2", second_prompt, dict(max_new_tokens=10))]})
    hits = (cached.engine.runner.counters() - before).prefix_hits
    assert hits == 64  # 40 prompt + 29 cached answer tokens: four whole blocks
    plain = StepDriver(tiny, max_running=2)
    plain.run({0: [("turn2", second_prompt, dict(max_new_tokens=10))]})
    assert cached.tokens["turn2"] == plain.tokens["turn2"]
