"""Every architecture of the suite, served from a local folder over gRPC, equals `generate()` on each request
alone: greedy requests running past the sliding window where the model has one, and seeded sampling, joining
one after another while the earlier ones stream. Unservable architectures are refused at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from genserve.scheduler.model.loader import LoadedModel, load_model
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.architectures import REFUSED, SERVED, VOCAB, Case, readme_table, save_tiny_model, tiny_config
from tests.conftest import hf_generate
from tests.references import with_plain_reference
from tests.serving import ServerThread, ids_request

GREEDY = [
    ([17, 40, 3, 250, 99], {"max_new_tokens": 20}),
    ([(i * 37) % VOCAB for i in range(3, 15)], {"max_new_tokens": 24}),
    ([(i * 11 + 5) % VOCAB for i in range(20)], {"max_new_tokens": 16}),
]
SAMPLED = [
    ([9, 8, 7, 6, 5, 4], {"max_new_tokens": 16, "do_sample": True, "temperature": 0.9, "top_k": 40, "seed": 11}),
    ([100, 200, 300], {"max_new_tokens": 12, "do_sample": True, "top_p": 0.9, "seed": 12}),
]


def _stream_staggered(stub, requests: list[pb.GenerateRequest]) -> list[list[int]]:  # noqa: ANN001
    """Start each request once the one before it has streamed two tokens; the tokens of each."""
    streaming = [threading.Event() for _ in requests]
    tokens: list[list[int]] = [[] for _ in requests]

    def run(index: int) -> None:
        if index:
            streaming[index - 1].wait(timeout=60)
        for chunk in stub.GenerateStream(requests[index], timeout=120):
            tokens[index].extend(chunk.token_ids)
            if len(tokens[index]) >= 2:
                streaming[index].set()
        streaming[index].set()

    with ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(run, range(len(requests))))
    return tokens


def _load_with_reference(case: Case, tmp_path: Path) -> LoadedModel:
    """The case's tiny model from a folder, as served, with a plain copy kept for `hf_generate`."""
    loaded = load_model(str(save_tiny_model(case, tmp_path)), device="cpu")
    with_plain_reference(loaded.model)
    return loaded


@pytest.mark.parametrize(
    "case", SERVED, ids=[case.model_type + ("-" + case.label if " " in case.label else "") for case in SERVED]
)
def test_served_equals_generate_alone(case: Case, tmp_path: Path) -> None:
    loaded = _load_with_reference(case, tmp_path)
    server = ServerThread(loaded, max_running=4)
    try:
        info = server.stub.ModelInfo(pb.ModelInfoRequest())
        assert info.architecture == type(loaded.model).__name__
        assert info.attn_implementation == loaded.model.config._attn_implementation
        cases = [(prompt, {**params, "ignore_eos": True}) for prompt, params in GREEDY + SAMPLED]
        served = _stream_staggered(server.stub, [ids_request(prompt, **params) for prompt, params in cases])
        for (prompt, params), tokens in zip(cases, served):
            expected = hf_generate(loaded.model, prompt, server.engine.make_parameters(**params))
            assert tokens == expected, f"{case.label} {params}"
            if case.sliding_window and not params.get("do_sample"):
                assert len(prompt) + len(tokens) > 2 * case.sliding_window
        # A degenerate random model (one token whatever the input) would hide masking and position errors.
        greedy = served[: len(GREEDY)]
        assert len({tuple(tokens) for tokens in greedy}) == len(GREEDY), f"{case.label}: outputs ignore the prompt"
        assert len(set().union(*greedy)) >= 10, f"{case.label}: the tiny model's output is degenerate"
    finally:
        server.close()


def test_eager_attention_is_chosen_where_the_model_needs_it(tmp_path: Path) -> None:
    gemma2 = next(case for case in SERVED if case.model_type == "gemma2")
    llama = next(case for case in SERVED if case.model_type == "llama")
    assert load_model(str(save_tiny_model(gemma2, tmp_path / "g")), device="cpu").attn_implementation == "eager"
    assert load_model(str(save_tiny_model(llama, tmp_path / "l")), device="cpu").attn_implementation == "sdpa"
    forced = load_model(str(tmp_path / "l"), device="cpu", attn_implementation="eager")
    assert forced.attn_implementation == "eager"


# The cause each refusal must name: the one that makes this architecture unservable, not a word any refusal has.
REFUSAL_CAUSES = {
    "mamba": "state-space or linear-attention layers",
    "jamba": "state-space or linear-attention layers",
    "falcon_h1": "hybrid layers (attention and state-space in parallel)",
    "qwen3_next": "state-space or linear-attention layers",
    "rwkv": "keep no attention KV of their own",
    "gemma3n_text": "cache layout is not one KV per layer",
    "llama4_text": "chunked local attention layers",
    "t5": "is an encoder-decoder model",
    "bart": "is an encoder-decoder model",
}


@pytest.mark.parametrize("case", REFUSED, ids=[case.model_type for case in REFUSED])
def test_refused_with_a_reason(case: Case) -> None:
    from tests.architectures import refusal

    message = refusal(case)
    assert case.model_type in message or "ForCausalLM" in message
    assert REFUSAL_CAUSES[case.model_type] in message, message
    assert set(REFUSAL_CAUSES) == {refused.model_type for refused in REFUSED}


@pytest.mark.parametrize("model_type", ["mamba", "rwkv"])
def test_serve_exits_at_start_up_naming_the_architecture(model_type: str, tmp_path: Path) -> None:
    """Refused by the config (Mamba) and by the cache's one-token probe (RWKV): the process ends before it
    listens, with the reason on stderr."""
    case = next(case for case in REFUSED if case.model_type == model_type)
    tiny_config(case).save_pretrained(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "genserve.service.cli.main",
            "serve",
            "--model",
            str(tmp_path),
            "--load-format",
            "dummy",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "GENSERVE_DEVICE": "cpu"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot serve this model" in result.stderr
    assert model_type in result.stderr.lower() or "Rwkv" in result.stderr


def test_readme_table_is_generated_from_the_suite() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert readme_table() in readme, "README's architecture table is stale: run `make architectures`"


@pytest.mark.parametrize("case", SERVED, ids=[case.label for case in SERVED])
def test_prompts_prefilled_together_equal_generate_alone(case: Case, tmp_path: Path) -> None:
    """Prompts admitted in the same step share one right-padded prefill (past the sliding window)."""
    from tests.conftest import StepDriver

    loaded = _load_with_reference(case, tmp_path)
    driver = StepDriver(loaded, max_running=8)
    # Ids from 3 up: generate() would mask a pad id (0) inside the reference prompt.
    lengths = (12, 14, 13, 15, 11)
    prompts = [[3 + (i * 7 + j * 13) % (VOCAB - 3) for j in range(length)] for i, length in enumerate(lengths)]
    for index, prompt in enumerate(prompts):
        driver.submit(f"r{index}", prompt, max_new_tokens=12, ignore_eos=True)
    driver.run()
    for index, prompt in enumerate(prompts):
        expected = hf_generate(loaded.model, prompt, driver.engine.make_parameters(max_new_tokens=12, ignore_eos=True))
        assert driver.tokens[f"r{index}"] == expected, f"{case.label} r{index}"


@pytest.mark.parametrize("case", SERVED, ids=[case.label for case in SERVED])
def test_prompts_prefilled_in_chunks_equal_generate_alone(case: Case, tmp_path: Path) -> None:
    """A prompt longer than the step budget is computed over several steps, each chunk reading the ones before
    it through the model's masks (sliding windows included), while two rows decode."""
    from tests.conftest import StepDriver

    loaded = _load_with_reference(case, tmp_path)
    driver = StepDriver(loaded, max_running=4, max_num_batched_tokens=9)
    prompts = {
        "short0": [3 + (j * 17) % (VOCAB - 3) for j in range(5)],
        "short1": [3 + (j * 29 + 4) % (VOCAB - 3) for j in range(6)],
        "long": [3 + (j * 13 + 7) % (VOCAB - 3) for j in range(31)],  # 5 chunks of 7, past a window of 8
    }
    schedule = {
        i: [(name, prompt, dict(max_new_tokens=12, ignore_eos=True))]
        for i, (name, prompt) in enumerate(prompts.items())
    }
    driver.run(schedule)
    for name, prompt in prompts.items():
        expected = hf_generate(loaded.model, prompt, driver.engine.make_parameters(max_new_tokens=12, ignore_eos=True))
        assert driver.tokens[name] == expected, f"{case.label} {name}"
