"""The compiled decode step (--compile, scheduler/model/compiled_step.py): traced at start-up, token-equal to
generate() while requests join and leave, and eager wherever it cannot run."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.model.compiled_step import additive_mask_of_pass, one_query_attention
from genserve.scheduler.model.loader import LoadedModel
from genserve.service.cli.flags import engine_config
from genserve.service.cli.main import build_parser
from tests.architectures import COMMON, SERVED, tiny_config
from tests.conftest import StepDriver, hf_generate, tiny_model
from tests.references import with_plain_reference

PAGED_MEMORY = 8 * 2**20


def _staggered_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, 64, (length,), generator=generator).tolist() for length in (5, 23, 41, 12, 60, 2)]


def _serve_staggered(driver: StepDriver, prompts: list[list[int]], new_tokens: int) -> None:
    """Requests of different lengths and budgets join every other step, so rows leave and join mid-flight; each
    one's tokens equal generate()'s on it alone."""
    driver.run(
        {
            step * 2: [(f"r{step}", prompt, {"max_new_tokens": new_tokens - 3 * step})]
            for step, prompt in enumerate(prompts)
        }
    )
    for index, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(max_new_tokens=new_tokens - 3 * index)
        assert driver.tokens[f"r{index}"] == hf_generate(driver.engine.loaded.model, prompt, params), f"r{index}"


@pytest.mark.parametrize(("kernel", "kv_cache_memory"), [("onednn", PAGED_MEMORY), ("aten", 0.0)])
def test_compiled_decode_streams_equal_generate_while_rows_join_and_leave(kernel: str, kv_cache_memory: float) -> None:
    tiny = LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny")
    driver = StepDriver(
        tiny, max_running=4, linear_kernel=kernel, kv_cache_memory=kv_cache_memory, decode_mode="compiled"
    )
    compiled = driver.engine.runner.compiled_decoder
    assert compiled.ready  # traced while the engine was built, before any request
    prompts = _staggered_prompts()
    _serve_staggered(driver, prompts, new_tokens=30)
    assert compiled.ready and compiled.passes > 40  # every decode pass ran the compiled graph
    if kv_cache_memory:  # the paged pool's passes without riders attend in the graph, rows at home
        assert 10 < compiled.passes_in_graph < compiled.passes


@pytest.mark.parametrize("kv_cache_memory", [PAGED_MEMORY, 0.0], ids=["paged", "slot"])
def test_a_one_row_server_runs_its_prompts_and_decodes_compiled(kv_cache_memory: float) -> None:
    """With one row, no pass ever decodes two rows; the prompts' flat passes still find a traced graph, so the
    step stays compiled (it used to trace the one-query graph alone, and the first prompt sent it to eager)."""
    tiny = LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny")
    driver = StepDriver(tiny, max_running=1, kv_cache_memory=kv_cache_memory, decode_mode="compiled")
    compiled = driver.engine.runner.compiled_decoder
    prompts = _staggered_prompts()[:3]
    budget = {"max_new_tokens": 6, "ignore_eos": True}
    driver.run({0: [(f"r{index}", prompt, budget) for index, prompt in enumerate(prompts)]})
    # Each request: its prompt's pass (the first token), then five decode passes.
    assert compiled.ready and compiled.riders == len(prompts) and compiled.passes == 6 * len(prompts)
    for index, prompt in enumerate(prompts):
        assert driver.tokens[f"r{index}"] == hf_generate(tiny.model, prompt, driver.engine.make_parameters(**budget))


def test_decode_attention_is_transformers_sdpa_attention_bit_for_bit() -> None:
    """The compiled step's decode attention calls SDPA without transformers' Python around it, with the boolean mask
    made additive once per pass: its output must be transformers' own, bit for bit, for rows of different lengths
    with grouped key heads, on every layer of a pass and after the mask changes with the next pass."""
    module = LlamaForCausalLM(LlamaConfig(**COMMON)).model.layers[0].self_attn
    heads, kv_heads, head_dim = COMMON["num_attention_heads"], COMMON["num_key_value_heads"], module.head_dim
    generator = torch.Generator().manual_seed(3)
    rows, length = 5, 37
    for lengths in ([37, 5, 20, 1, 30], [12, 37, 37, 2, 9]):  # two passes
        query = torch.randn(rows, heads, 1, head_dim, generator=generator)
        keys, values = (torch.randn(rows, kv_heads, length, head_dim, generator=generator) for _ in range(2))
        mask = (torch.arange(length) < torch.tensor(lengths).unsqueeze(1)).view(rows, 1, 1, length)
        expected = sdpa_attention_forward(module, query, keys, values, mask, scaling=module.scaling)[0]
        for _layer in range(2):
            additive = additive_mask_of_pass(mask, query.dtype)
            attended = one_query_attention(query, keys, values, additive, module.scaling)
            assert torch.equal(attended, expected)


def test_two_models_of_one_class_each_run_their_own_compiled_graph() -> None:
    """The compiled step drops dynamo's guards on the model's modules; another model of the same class (here with
    another layer count and width) compiled in the same process must still get graphs of its own."""
    wider = LlamaForCausalLM(LlamaConfig(**COMMON | dict(hidden_size=96, num_hidden_layers=3))).eval()
    drivers = []
    for model in (tiny_model(), wider):
        loaded = LoadedModel(model=with_plain_reference(model), tokenizer=None, name="tiny")
        drivers.append(StepDriver(loaded, max_running=4, kv_cache_memory=PAGED_MEMORY, decode_mode="compiled"))
    for driver in drivers:  # both compiled before either serves: the second one's trace must not be the first's
        _serve_staggered(driver, _staggered_prompts()[:4], new_tokens=14)
        compiled = driver.engine.runner.compiled_decoder
        assert compiled.ready and compiled.passes > 10


def _llama_with_eager_attention() -> torch.nn.Module:
    model = tiny_model()
    model.set_attn_implementation("eager")
    return model


def _bloom() -> torch.nn.Module:
    case = next(case for case in SERVED if case.model_type == "bloom")
    return AutoModelForCausalLM.from_config(tiny_config(case)).eval()


def _llama_with_a_layer_past_the_interface() -> torch.nn.Module:
    """One layer on a config of its own keeps calling SDPA itself when the step swaps the implementation in the
    shared config: its keys are then the new token's alone, while its mask spans the cached positions."""
    model = tiny_model()
    attention = model.model.layers[1].self_attn
    attention.config = copy.copy(attention.config)
    return model


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_llama_with_eager_attention, "eager attention"),
        (_bloom, "attention interface"),
        (_llama_with_a_layer_past_the_interface, "compiling the decode step failed"),
    ],
    ids=["eager-attention", "own-attention", "a-layer-past-the-interface"],
)
def test_a_model_the_compiled_step_cannot_take_decodes_eagerly_with_a_log_line(
    build: Callable[[], torch.nn.Module], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Attention the compiled step's op cannot stand in for: eager attention (soft-capping, sinks), a model whose
    attention does not run through transformers' attention interface (Bloom's ALiBi), or one layer that goes
    past it (which fails the start-up trace)."""
    tiny = LoadedModel(model=with_plain_reference(build()), tokenizer=None, name="tiny")
    with caplog.at_level(logging.WARNING, logger="genserve.scheduler.model.compiled_step"):
        driver = StepDriver(tiny, max_running=4, decode_mode="compiled")
    assert reason in caplog.text and "decoding eagerly" in caplog.text
    prompts = _staggered_prompts()[:3]
    _serve_staggered(driver, prompts, new_tokens=12)
    assert driver.engine.runner.compiled_decoder.passes == 0


def test_a_failing_compiled_pass_falls_back_to_eager_for_good_and_loses_no_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tiny = LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny")
    driver = StepDriver(tiny, max_running=4, kv_cache_memory=PAGED_MEMORY, decode_mode="compiled")
    compiled = driver.engine.runner.compiled_decoder
    traced = compiled.compiled
    calls = []

    def fails_on_the_fifth_pass(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 5:  # what a pass that would compile again raises under the fail_on_recompile stance
            raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")
        return traced(*args, **kwargs)

    compiled.compiled = fails_on_the_fifth_pass
    prompts = _staggered_prompts()[:3]
    with caplog.at_level(logging.WARNING, logger="genserve.scheduler.model.compiled_step"):
        _serve_staggered(driver, prompts, new_tokens=16)  # the third request's prompt rides in the failing pass
    assert "would compile again or failed" in caplog.text
    assert not compiled.ready and compiled.passes == 4 and len(calls) == 5
    assert compiled.riders == 2  # the first two requests' prompts rode; the third's was prefilled eagerly instead


@pytest.mark.parametrize(
    "cache",
    [  # paged: the long prompt's first chunk stops at the token budget; slot: it waits for the next step's
        dict(kv_cache_memory=PAGED_MEMORY, prefix_caching=True, max_num_batched_tokens=40),
        dict(kv_cache_memory=0.0, max_num_batched_tokens=200),
    ],
    ids=["paged-prefix-cached", "slot-cache"],
)
def test_prompts_ride_in_the_compiled_decode_pass_and_equal_generate(cache: dict) -> None:
    """While a request decodes, new requests arrive together: tails after a cached system prompt (paged), a fresh
    prompt, a repeat of another's prompt and a prompt too long for the step's token budget. One forward decodes
    the running row and computes every prompt chunk but the repeat's (it takes its twin's KV); the long prompt's
    later chunk rides in a later pass; every output equals generate() on its request alone."""
    tiny = LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny")
    driver = StepDriver(tiny, max_running=8, decode_mode="compiled", **cache)
    runner = driver.engine.runner
    planned = []  # every prompt chunk, all but the first's while "first" decodes
    execute = runner.execute
    runner.execute = lambda plan: planned.extend(plan.prefills) or execute(plan)
    system = list(range(100, 148))
    driver.submit("first", system + [3], max_new_tokens=30, ignore_eos=True)
    driver.engine.step()  # a flat pass of its prompt alone; paged, the system prompt's blocks are then cached
    assert runner.compiled_decoder.riders == 1
    prompts = {
        "tail-a": system + [5, 6, 7, 8],
        "tail-b": system + [9] * 7,
        "fresh": list(range(3, 14)),
        "repeat": system + [5, 6, 7, 8],
        "long": system + list(range(20, 60)),
    }
    for name, prompt in prompts.items():
        driver.submit(name, prompt, max_new_tokens=12)
    forwards = []
    hook = runner.model.register_forward_hook(lambda module, args, output: forwards.append(1))
    driver.engine.step()
    hook.remove()
    assert len(forwards) == 1 and runner.compiled_decoder.riders == len(planned) - 1 >= 3
    driver.run()
    assert not driver.errors and runner.compiled_decoder.ready
    assert runner.compiled_decoder.riders == len(planned) - 1  # all but the repeat, the long prompt's last too
    params = driver.engine.make_parameters(max_new_tokens=30, ignore_eos=True)
    assert driver.tokens["first"] == hf_generate(tiny.model, system + [3], params)
    for name, prompt in prompts.items():
        expected = hf_generate(tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=12))
        assert driver.tokens[name] == expected, name


def test_compile_flag_and_what_it_refuses() -> None:
    parser = build_parser()
    assert engine_config(parser.parse_args(["serve", "--compile"])).decode_mode == "compiled"
    assert engine_config(parser.parse_args(["serve"])).decode_mode == "auto"
    with pytest.raises(ValueError, match="does not serve LoRA adapters"):
        EngineConfig(decode_mode="compiled", lora_dir="/adapters")
    with pytest.raises(ValueError, match="compiled decode step"):
        EngineConfig(decode_mode="compiled", tensor_parallel_size=2)
