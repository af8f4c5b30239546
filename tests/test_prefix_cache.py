"""Prefix caching on the paged cache: requests sharing a prompt prefix reference its KV blocks instead of computing
them again, and their outputs equal generate() on each request alone."""

from __future__ import annotations

import random

import grpc
import pytest

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_VOCAB, StepDriver, hf_generate
from tests.serving import ServerThread, ids_request, scrape

SYSTEM = list(range(100, 148))  # a 48-token shared prefix: three 16-token blocks
BLOCK_BYTES = 16 * 2 * 2 * 2 * 16 * 4  # positions x layers x (keys, values) x kv heads x head_dim x fp32
POOL = 201 * BLOCK_BYTES  # 200 blocks (one more is scratch)


def _cached_driver(tiny, blocks: int = 200, **config: object) -> StepDriver:  # noqa: ANN001
    return StepDriver(tiny, kv_cache_memory=(blocks + 1) * BLOCK_BYTES, prefix_caching=True, **config)


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
    cached = _cached_driver(tiny, max_running=4)
    plain = StepDriver(tiny, max_running=4)
    cached.run(_requests(8))
    plain.run(_requests(8))
    assert cached.tokens == plain.tokens and len(cached.tokens) == 8
    counters = cached.engine.runner.counters()
    assert counters.prefix_queried == 8 * (len(SYSTEM) + 3)
    assert counters.prefix_hits == 7 * len(SYSTEM)  # every request after the first finds the three system blocks
    params = plain.engine.make_parameters(max_new_tokens=12)
    assert cached.tokens["r0"] == hf_generate(tiny.model, SYSTEM + [10, 20, 7], params)


@pytest.mark.parametrize("blocks", [200, 24], ids=["roomy-pool", "crowded-pool"])
def test_requests_arriving_together_compute_the_prefix_once(tiny, blocks: int) -> None:
    """Eight questions after one system prompt, all submitted at once: the first computes the prefix, the others
    wait one step and find its blocks. While half the pool is free, each copies them into its home (every row then
    reads in place); past that, rows reference them, and the pool holds the prefix once for all of those."""
    driver = _cached_driver(tiny, blocks=blocks, max_running=8)
    questions = [[3 + i, 40 + i, 80 + 2 * i] for i in range(8)]
    for i, question in enumerate(questions):
        driver.submit(f"q{i}", SYSTEM + question, max_new_tokens=10 + i)
    pool = driver.engine.scheduler.blocks
    peak_shared = 0
    while driver.engine.step():
        running = driver.engine.scheduler.running
        if len(running) == 8:
            tables = [pool.table(seq) for seq in running]
            held = {block for table in tables for block in table}
            assert pool.num_used == len(held)  # shared blocks counted once
            peak_shared = max(peak_shared, *(pool.references(table[0]) for table in tables))
            at_home = [pool.is_home(seq) for seq in running]
            assert all(at_home) == (blocks == 200), at_home
    assert driver.engine.runner.counters().prefix_hits == 7 * len(SYSTEM)
    assert (peak_shared == 1) == (blocks == 200)  # roomy: copied home; crowded: one first block for several rows
    for i, question in enumerate(questions):
        params = driver.engine.make_parameters(max_new_tokens=10 + i)
        assert driver.tokens[f"q{i}"] == hf_generate(tiny.model, SYSTEM + question, params), f"q{i}"


@pytest.mark.parametrize("blocks", [200, 16], ids=["roomy-pool", "crowded-pool"])
def test_identical_prompts_admitted_together_compute_once(tiny, blocks: int) -> None:
    """n samples of one prompt: one prefill; the others copy its KV into their own blocks while half the pool is
    free (each row reads in place), else reference its full blocks and copy its last partial one."""
    driver = _cached_driver(tiny, blocks=blocks, max_running=4)
    prompt = SYSTEM + [9, 8, 7, 6, 5]  # three full blocks and five tokens
    for i in range(3):
        driver.submit(f"s{i}", prompt, max_new_tokens=20, do_sample=True, seed=i)
    driver.engine.step()
    pool = driver.engine.scheduler.blocks
    tables = [pool.table(seq) for seq in driver.engine.scheduler.running]
    assert len(tables) == 3 and len({table[3] for table in tables}) == 3  # the partial block each writes is its own
    if blocks == 200:
        assert len({block for table in tables for block in table}) == pool.num_used == 3 * 4
        assert all(pool.is_home(seq) for seq in driver.engine.scheduler.running)
    else:  # the first twin to share leaves the pool roomy enough for the next to copy: some blocks are shared
        assert tables[0][0] == tables[1][0] == tables[2][0] and pool.num_used < 3 * 4
    driver.run()
    for i in range(3):
        params = driver.engine.make_parameters(max_new_tokens=20, do_sample=True, seed=i)
        alone = StepDriver(tiny, max_running=1)
        alone.submit("alone", prompt, **{"max_new_tokens": 20, "do_sample": True, "seed": i})
        alone.run()
        assert driver.tokens[f"s{i}"] == alone.tokens["alone"], params


@pytest.mark.parametrize("blocks", [200, 40], ids=["roomy-pool", "crowded-pool"])
def test_requests_continuing_a_cached_prefix_are_computed_in_one_forward(tiny, blocks: int) -> None:
    """Six requests find the system prompt cached and arrive together while another decodes, with tails of
    different lengths (the last too long for the step's token budget, so that its first chunk stops short): one
    forward computes every tail, each row from its own position, and every output equals generate() alone, greedy
    and sampled."""
    driver = _cached_driver(tiny, blocks=blocks, max_running=8, max_num_batched_tokens=27)
    driver.submit("first", SYSTEM + [3], max_new_tokens=30, ignore_eos=True)
    driver.engine.step()  # its prefill registers the system prompt's blocks; it decodes on beside the others
    forwards = []
    hook = driver.engine.runner.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    tails = [[5 + i] * (4 + i % 2) for i in range(5)] + [list(range(20, 60))]  # 22 tokens, then 5 of the last
    overrides = [dict(max_new_tokens=8 + i, do_sample=i % 2 == 1, seed=i, top_k=20) for i in range(6)]
    for i, tail in enumerate(tails):
        driver.submit(f"c{i}", SYSTEM + tail, **overrides[i])
    driver.engine.step()
    hook.remove()
    # The first request's decode, and every tail; the compiled step computes the tails in its decode pass.
    assert len(forwards) == (1 if driver.engine.runner.compiled_decoder is not None else 2)
    assert len(driver.engine.scheduler.running) == 6  # the long one still prefills
    driver.run()
    assert driver.engine.runner.counters().prefix_hits == 6 * len(SYSTEM)
    for i, tail in enumerate(tails):
        params = driver.engine.make_parameters(**overrides[i])
        alone = StepDriver(tiny, max_running=1)
        alone.submit("alone", SYSTEM + tail, **overrides[i])
        alone.run()
        assert driver.tokens[f"c{i}"] == alone.tokens["alone"], f"c{i}"
        if not params.is_sampling:
            assert driver.tokens[f"c{i}"] == hf_generate(tiny.model, SYSTEM + tail, params), f"c{i}"


def test_a_different_cache_salt_never_shares(tiny) -> None:
    driver = _cached_driver(tiny, max_running=2)
    driver.run({0: [("tenant-a", SYSTEM + [5], dict(max_new_tokens=4, options=dict(cache_salt="a")))]})
    before = driver.engine.runner.counters().prefix_hits
    driver.run({0: [("tenant-b", SYSTEM + [6], dict(max_new_tokens=4, options=dict(cache_salt="b")))]})
    driver.run({0: [("no-salt", SYSTEM + [6], dict(max_new_tokens=4))]})
    assert driver.engine.runner.counters().prefix_hits == before == 0
    driver.run({0: [("tenant-a-again", SYSTEM + [7], dict(max_new_tokens=4, options=dict(cache_salt="a")))]})
    assert driver.engine.runner.counters().prefix_hits == len(SYSTEM)
    params = driver.engine.make_parameters(max_new_tokens=4)
    assert driver.tokens["tenant-b"] == driver.tokens["no-salt"] == hf_generate(tiny.model, SYSTEM + [6], params)


def test_a_small_pool_evicts_free_blocks_only_and_stays_correct(tiny) -> None:
    """Six different 40-token prompts (two full blocks each) pass through a pool of 8 blocks, then the first prompt
    comes again: its blocks were evicted, so it finds nothing; a roomy pool serves it both blocks."""
    schedule = {i: [(f"p{i}", [(7 * i + j) % 300 + 3 for j in range(40)], dict(max_new_tokens=6))] for i in range(6)}
    schedule[8] = [("again", schedule[0][0][1], dict(max_new_tokens=6))]
    small, roomy = _cached_driver(tiny, blocks=8, max_running=2), _cached_driver(tiny, max_running=2)
    plain = StepDriver(tiny, max_running=2)
    for driver in (small, roomy, plain):
        driver.run(dict(schedule))
    assert small.tokens == plain.tokens == roomy.tokens
    assert small.engine.scheduler.blocks.evicted_blocks >= 4
    assert small.engine.runner.counters().prefix_hits == 0
    assert roomy.engine.scheduler.blocks.evicted_blocks == 0
    assert roomy.engine.runner.counters().prefix_hits == 32  # "again" found its two blocks


def test_preemption_with_shared_blocks_and_a_crowded_pool_stays_exact(tiny) -> None:
    """Twelve requests on one prefix through a pool too small for them all: preempted rows drop their references,
    come back, find their blocks (or recompute them), and every output equals generate() alone."""
    rng = random.Random(3)
    driver = _cached_driver(tiny, blocks=20, max_running=6, kv_admission_reserve=0.0)
    preempted: list[int] = []
    driver.engine.on_step = lambda stats: preempted.append(stats.num_preempted_for_kv)
    prompts = [SYSTEM + [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    schedule: dict[int, list] = {}
    for i, prompt in enumerate(prompts):
        schedule.setdefault(i // 3, []).append((f"r{i}", prompt, dict(max_new_tokens=40)))
    driver.run(schedule)
    assert sum(preempted) >= 1 and not driver.errors
    assert driver.engine.runner.counters().prefix_hits >= 3 * len(SYSTEM)
    pool = driver.engine.scheduler.blocks
    assert pool.num_used == 0 and pool.num_free == 20 and pool.num_cached_free > 0
    params = driver.engine.make_parameters(max_new_tokens=40)
    for i, prompt in enumerate(prompts):
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompt, params), f"r{i}"


def test_prefix_cache_hits_and_cached_blocks_reach_the_metrics(tiny) -> None:
    server = ServerThread(tiny, metrics=True, kv_cache_memory=POOL, prefix_caching=True, max_running=4)
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
        assert values["genserve_kv_blocks_cached"] >= len(SYSTEM) // 16  # the system prompt outlives its requests
        assert values["genserve_kv_blocks_free"] == 200
    finally:
        server.close()


def test_the_next_chat_turn_reuses_the_previous_answer(tiny) -> None:
    first_prompt = list(range(60, 100))
    cached = _cached_driver(tiny, max_running=2)
    cached.run({0: [("turn1", first_prompt, dict(max_new_tokens=30, ignore_eos=True))]})
    second_prompt = first_prompt + cached.tokens["turn1"] + [5, 6, 7]
    before = cached.engine.runner.counters()
    cached.run({0: [("turn2", second_prompt, dict(max_new_tokens=10))]})
    hits = (cached.engine.runner.counters() - before).prefix_hits
    assert hits == 64  # 40 prompt + 29 cached answer tokens: four whole blocks
    plain = StepDriver(tiny, max_running=2)
    plain.run({0: [("turn2", second_prompt, dict(max_new_tokens=10))]})
    assert cached.tokens["turn2"] == plain.tokens["turn2"]


def test_cache_salt_through_every_protocol(tiny_with_tokenizer) -> None:
    """genserve.v1's `cache_salt`, KServe's `cache_salt` request parameter and TGIS's `x-cache-salt` metadata
    each keep a tenant's prefix apart; a salt too long is refused, naming the field."""
    from genserve.service.proto_gen.fmaas import generation_pb2 as tgis
    from genserve.service.proto_gen.fmaas import generation_pb2_grpc
    from genserve.service.proto_gen.inference import grpc_service_pb2 as kpb
    from genserve.service.proto_gen.inference import grpc_service_pb2_grpc

    server = ServerThread(tiny_with_tokenizer, kv_cache_memory=2**22, prefix_caching=True, max_running=4)
    text = "the same long system prompt, word after word, " * 6

    def hits() -> int:
        return server.engine.runner.counters().prefix_hits

    def native(salt: str) -> None:
        server.stub.Generate(pb.GenerateRequest(text=text, cache_salt=salt, parameters=dict(max_new_tokens=2)))

    try:
        native("a")
        native("b")
        assert hits() == 0
        request = tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=text)])
        generation_pb2_grpc.GenerationServiceStub(server.channel).Generate(request, metadata=[("x-cache-salt", "a")])
        after_tgis = hits()
        assert after_tgis > 0
        infer = kpb.ModelInferRequest(
            model_name=server.engine.loaded.name,
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name="text_input",
                    datatype="BYTES",
                    shape=[1],
                    contents=kpb.InferTensorContents(bytes_contents=[text.encode()]),
                )
            ],
        )
        infer.parameters["cache_salt"].string_param = "b"
        grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(infer)
        assert hits() == 2 * after_tgis
        with pytest.raises(grpc.RpcError) as refused:
            native("x" * 257)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in refused.value.details()
    finally:
        server.close()


def test_guidance_companions_share_a_cached_negative_prompt(tiny) -> None:
    """Classifier-free guidance's unconditional rows look their prompt up like any request: a second guided
    request with the same long negative prompt finds its blocks cached, and both equal the uncached run."""
    negative = list(range(200, 240))  # 40 tokens: two full blocks
    schedule = {
        step: [(f"g{step}", SYSTEM[:20] + [step + 3], dict(max_new_tokens=8, guidance_scale=2.0))] for step in (0, 12)
    }
    runs = []
    for driver in (_cached_driver(tiny, max_running=4), StepDriver(tiny, max_running=4)):
        for step_requests in schedule.values():
            for request_id, prompt, overrides in step_requests:
                driver.submit(request_id, prompt, **overrides, options=dict(negative_prompt_ids=tuple(negative)))
            driver.run()
        runs.append(driver)
    cached, plain = runs
    assert cached.tokens == plain.tokens and len(cached.tokens) == 2
    # The second request finds its prompt's first block (SYSTEM[:16]), its companion the negative prompt's two.
    assert cached.engine.runner.counters().prefix_hits == 16 + 32
