"""The paged KV cache: blocks handed out by the scheduler, admission and preemption by KV held, exact tokens."""

from __future__ import annotations

import random
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.kv_blocks import BlockPool
from genserve.scheduler.core.params import ValidationError
from genserve.scheduler.core.request import Priority
from genserve.scheduler.core.scheduler import Scheduler
from genserve.scheduler.core.step_plan import ModelOutput, RowResult, StepPlan, StopCode
from genserve.scheduler.model.loader import LoadedModel
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_VOCAB, StepDriver, hf_generate, tiny_model
from tests.references import with_plain_reference
from tests.serving import ServerThread, ids_request, wait_for
from tests.test_engine_parity import MIXED_PARAMETERS
from tests.test_scheduler import _seq

TINY_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # layers x (keys, values) x kv heads x head_dim x fp32
BLOCK_BYTES = 16 * TINY_BYTES_PER_TOKEN


def _prompts(count: int, seed: int, longest: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, longest))] for _ in range(count)]


def test_block_pool_hands_out_whole_blocks_and_takes_them_back() -> None:
    pool = BlockPool(num_blocks=10, block_size=16, reserve_fraction=0.2)
    first, second = _seq("a", 1), _seq("b", 1)
    assert pool.grow(first, 33) and pool.held(first) == 3  # 33 positions: three blocks
    assert pool.missing(first, 48) == 0 and pool.missing(first, 49) == 1
    assert pool.can_admit(5) and not pool.can_admit(6)  # 7 free, 2 of them the reserve
    assert not pool.grow(second, 16 * 8) and pool.held(second) == 0 and pool.num_free == 7  # all or nothing
    assert pool.grow(second, 16 * 7) and pool.num_free == 0
    pool.free(first)
    assert pool.num_free == 3 and pool.held(first) == 0
    assert pool.grow(first, 16) and pool.held(first) == 1 and pool.num_used == 8


def _decode_step(scheduler: Scheduler, now: float) -> StepPlan:
    """Schedule and answer a step as a model would: token 7 for every row that gets one."""
    plan, _ = scheduler.schedule(now)
    getting = [*plan.decodes, *(chunk.seq for chunk in plan.prefills if chunk.completes)]
    output = ModelOutput({seq.request_id: RowResult((7,), StopCode.RUNNING) for seq in getting})
    scheduler.update(plan, output, now, deadline_margin=0.0)
    return plan


def test_admission_waits_for_blocks_and_growth_preempts_the_least_important() -> None:
    blocks = BlockPool(num_blocks=12, block_size=16)
    # No speculation: each decoding row needs blocks for its next token only.
    scheduler = Scheduler(EngineConfig(max_running=8, kv_admission_reserve=0.0, speculation_max_rows=0), blocks)
    old = _seq("old", 60, priority=Priority.BATCH)  # 60 tokens: 4 blocks each, room for 4 more tokens
    interactive, new, late = _seq("interactive", 60), _seq("new", 60, priority=Priority.BATCH), _seq("late", 60)
    scheduler.add(old)
    _decode_step(scheduler, now=0.0)
    scheduler.add(interactive)
    scheduler.add(new)
    plan = _decode_step(scheduler, now=1.0)
    assert [chunk.seq.request_id for chunk in plan.prefills] == ["interactive", "new"]
    assert {member.request_id: count for member, count in plan.kv_blocks} == {"interactive": 4, "new": 4}
    assert blocks.num_free == 0
    scheduler.add(late)
    for now in (2.0, 3.0, 4.0):  # "late" waits for blocks, not for a row (5 of 8 are free)
        plan = _decode_step(scheduler, now)
        assert not plan.prefills and not plan.preempted
    plan = _decode_step(scheduler, now=5.0)  # "old" now holds 65 tokens: it needs a fifth block
    # The least important is the newest batch request: it goes back to the queue, and "old" gets a block.
    assert [seq.request_id for seq in plan.preempted] == ["new"] and plan.num_preempted_for_kv == 1
    assert [seq.request_id for seq in plan.decodes] == ["old", "interactive"] and not plan.prefills
    assert new.num_computed_tokens == 0 and new.generated_ids == [7] * 4  # kept: recomputed when readmitted
    assert [(member.request_id, count) for member, count in plan.kv_blocks] == [("old", 5)]
    assert blocks.num_free == 3  # "late" needs 4: still waiting


def test_exhausted_kv_preempts_and_every_request_completes_as_undisturbed(tiny) -> None:
    """A pool of 16 blocks (256 positions) under 20 staggered requests of mixed parameters: rows are preempted
    when blocks run out, recomputed later, and every output equals generate() on the request alone."""
    driver = StepDriver(tiny, max_running=6, kv_cache_memory=17 * BLOCK_BYTES, kv_admission_reserve=0.1)
    assert driver.engine.scheduler.blocks.num_blocks == 16
    preempted: list[int] = []
    driver.engine.on_step = lambda stats: preempted.append(stats.num_preempted_for_kv)
    prompts = _prompts(len(MIXED_PARAMETERS) * 2, seed=1)
    schedule: dict[int, list] = {}
    for i, prompt in enumerate(prompts):
        schedule.setdefault((i * 3) % 17, []).append((f"r{i}", prompt, MIXED_PARAMETERS[i % len(MIXED_PARAMETERS)]))
    driver.run(schedule)
    assert sum(preempted) >= 2 and not driver.errors
    for i, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(**MIXED_PARAMETERS[i % len(MIXED_PARAMETERS)])
        assert driver.tokens[f"r{i}"] == hf_generate(tiny.model, prompt, params), f"request r{i} {params}"
    assert driver.engine.scheduler.blocks.num_free == 16 and driver.engine.snapshot.kv_cache_usage_ratio == 0


def test_seeded_sampling_survives_preemption_and_batch_mates(tiny) -> None:
    prompt = _prompts(1, seed=7)[0]
    request = {"max_new_tokens": 40, "do_sample": True, "seed": 1234, "temperature": 0.8, "top_k": 30}
    alone = StepDriver(tiny, max_running=8)
    alone.submit("seeded", prompt, **request)
    alone.run()
    crowded = StepDriver(tiny, max_running=8, kv_cache_memory=13 * BLOCK_BYTES, kv_admission_reserve=0.0)
    preempted: list[int] = []
    crowded.engine.on_step = lambda stats: preempted.append(stats.num_preempted_for_kv)
    others = _prompts(6, seed=8, longest=40)
    schedule = {0: [("seeded", prompt, request)]}
    schedule[1] = [
        (f"o{i}", p, {"max_new_tokens": 40, "do_sample": True, "temperature": 1.5}) for i, p in enumerate(others)
    ]
    crowded.run(schedule)
    assert sum(preempted) >= 1
    assert crowded.tokens["seeded"] == alone.tokens["seeded"]


def test_a_long_prompt_is_served_next_to_short_ones_in_a_budget_no_slot_could_hold() -> None:
    """A 12,000-token prompt decodes beside short requests in 8 MB of KV, where slots of the same 16,384-token
    context would hold 8 MB / (16,384 x 512 B) = 1 row; all outputs equal generate()."""
    model = with_plain_reference(tiny_model(seed=3, max_position_embeddings=16384))
    loaded = LoadedModel(model=model, tokenizer=None, name="tiny-long")
    driver = StepDriver(loaded, max_running=4, max_context=16384, kv_cache_memory=8 * 2**20)
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, TINY_VOCAB) for _ in range(12_000)]
    short = _prompts(3, seed=6)
    driver.run(
        {
            0: [(f"s{i}", p, {"max_new_tokens": 30}) for i, p in enumerate(short)]
            + [("long", long_prompt, {"max_new_tokens": 12})]
        }
    )
    assert driver.tokens["long"] == hf_generate(
        loaded.model, long_prompt, driver.engine.make_parameters(max_new_tokens=12)
    )
    for i, prompt in enumerate(short):
        assert driver.tokens[f"s{i}"] == hf_generate(
            loaded.model, prompt, driver.engine.make_parameters(max_new_tokens=30)
        )


@pytest.mark.parametrize("decode_mode", ["eager", "static"])
def test_paged_tokens_equal_slot_tokens_with_guidance_speculation_and_prefix_cache(tiny, decode_mode: str) -> None:
    """Every feature that touches the cache (guidance companions, speculative writes, shared prefix blocks, twins
    sharing their prompt, the static decode buckets of CUDA graphs) gives the slot cache's tokens on the paged
    one."""
    prompts = _prompts(8, seed=11)
    shared = prompts[0] * 3
    schedule: dict[int, list] = {}
    for i, prompt in enumerate(prompts):
        overrides: dict = {"max_new_tokens": 20 + 3 * i}
        if i == 1:
            overrides.update(guidance_scale=1.5)
        if i == 2:
            overrides.update(prompt_lookup_num_tokens=3)
        schedule.setdefault(2 * i, []).append((f"r{i}", shared + prompt if i % 3 == 0 else prompt, overrides))
    schedule.setdefault(3, []).append(("twin", shared + prompts[3], {"max_new_tokens": 15}))
    schedule[3].append(("twin2", shared + prompts[3], {"max_new_tokens": 15}))
    outputs = []
    for memory in (0, 200 * BLOCK_BYTES):  # room for all: preemption (and recomputing) is tested above
        driver = StepDriver(
            tiny, max_running=6, decode_mode=decode_mode, kv_cache_memory=memory, prefix_caching=bool(memory)
        )
        driver.run(dict(schedule))
        assert not driver.errors
        outputs.append(driver.tokens)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 10


def test_a_request_larger_than_the_whole_pool_is_refused_at_submission(tiny) -> None:
    driver = StepDriver(tiny, max_running=4, kv_cache_memory=9 * BLOCK_BYTES)  # 8 blocks: 128 positions
    with pytest.raises(ValidationError, match="max_new_tokens.*KV cache holds 128"):
        driver.submit("big", [5] * 60, max_new_tokens=60)
    driver.submit("fits", [5] * 40, max_new_tokens=60)
    driver.run()
    assert len(driver.tokens["fits"]) == 60


def test_kv_memory_setting_sizes_the_pool(tiny) -> None:
    assert EngineConfig().paged is False
    with pytest.raises(ValueError, match="holds no block"):
        StepDriver(tiny, kv_cache_memory=BLOCK_BYTES + 1)  # one block: the scratch block alone
    driver = StepDriver(tiny, kv_cache_memory=101 * BLOCK_BYTES + 100)
    assert driver.engine.scheduler.blocks.num_blocks == 100
    assert driver.engine.snapshot.kv_blocks_free == driver.engine.snapshot.kv_blocks_total == 100
    driver.submit("r", [5, 6, 7], max_new_tokens=3)
    driver.engine.step()
    assert driver.engine.snapshot.kv_blocks_free == 99 and driver.engine.snapshot.kv_blocks_total == 100


def test_blocks_in_metrics_and_model_info(tiny) -> None:
    server = ServerThread(tiny, max_running=4, metrics=True, kv_cache_memory=101 * BLOCK_BYTES)  # 100 blocks

    def metrics() -> dict[tuple[str, str], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read()
        families = text_string_to_metric_families(text.decode())
        return {(s.name, s.labels.get("cause", "")): s.value for family in families for s in family.samples}

    try:
        limits = server.stub.ModelInfo(pb.ModelInfoRequest()).limits
        assert (limits.kv_cache_tokens, limits.kv_block_size) == (1600, 16)
        stream = server.stub.GenerateStream(ids_request([5] * 40, max_new_tokens=500, ignore_eos=True))
        next(stream)
        wait_for(lambda: server.engine.snapshot.kv_blocks_free < 100)
        held = metrics()
        assert held[("genserve_kv_blocks", "")] == 100
        assert held[("genserve_kv_blocks_free", "")] in (96, 97, 98)  # 40 tokens and those generated: 3 to 4 blocks
        assert held[("genserve_kv_cache_usage_ratio", "")] == (100 - held[("genserve_kv_blocks_free", "")]) / 100
        assert held[("genserve_preemptions_total", "kv_cache")] == held[("genserve_preemptions_total", "priority")] == 0
        _, call = server.stub.Generate.with_call(ids_request([8, 9], max_new_tokens=4))
        assert call.code() == grpc.StatusCode.OK
        stream.cancel()
        assert wait_for(lambda: server.engine.snapshot.kv_blocks_free == 100)
        assert metrics()[("genserve_kv_blocks_free", "")] == 100
    finally:
        server.close()
