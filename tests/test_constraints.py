"""Constrained decoding over gRPC, each constrained request in a batch with plain ones."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import llguidance
import llguidance.hf
import llguidance.torch
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.scheduler.core.request import Constraint
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_EOS, hf_generate
from tests.serving import ServerThread, ids_request

EMAIL = r"[a-z]{2,6}@(example|test)\.(com|org)"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "admin"],
    "additionalProperties": False,
}
GRAMMAR = """
start: expr
expr: NUMBER (OP NUMBER){0,3}
NUMBER: /[1-9][0-9]{0,2}/
OP: "+" | "-" | "*"
"""
COLOURS = ["red", "green", "blue", "violet"]


@pytest.fixture(scope="module")
def server(tiny_with_tokenizer):
    running = ServerThread(tiny_with_tokenizer, max_running=24)
    yield running
    running.close()


def _constrained(seed: int, **constraint: object) -> pb.GenerateRequest:
    request = ids_request([30 + seed % 7, 40, 41 + seed % 5], max_new_tokens=80, do_sample=True, seed=seed, top_k=0)
    request.constraint.CopyFrom(pb.Constraint(**constraint))
    return request


def _hf_constrained(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, allowed) -> list[int]:  # noqa: ANN001
    """HF's own constrained greedy decoding: generate(prefix_allowed_tokens_fn=allowed)."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=TINY_EOS,
            pad_token_id=0,
            prefix_allowed_tokens_fn=allowed,
        )
    return output[0, len(prompt) :].tolist()


def _text_before_eos(response: pb.GenerateResponse) -> str:
    assert response.finish_reason in (pb.CONSTRAINT_COMPLETE, pb.EOS_TOKEN), response
    return response.text


def test_constrained_outputs_always_match_over_many_seeds(server, tiny_with_tokenizer) -> None:
    kinds = {
        "regex": dict(regex=EMAIL),
        "json_schema": dict(json_schema=json.dumps(SCHEMA)),
        "choice": dict(choice=pb.Choices(choices=COLOURS)),
        "grammar": dict(grammar=GRAMMAR),
    }
    plain_prompt = [60, 61, 62, 63]
    plain_params = server.engine.make_parameters(max_new_tokens=40)
    futures = {
        (kind, seed): server.stub.Generate.future(_constrained(seed, **constraint))
        for seed in range(12)
        for kind, constraint in kinds.items()
    }
    plain = [server.stub.Generate.future(ids_request(plain_prompt, max_new_tokens=40)) for _ in range(3)]
    for (kind, seed), future in futures.items():
        text = _text_before_eos(future.result(timeout=120))
        if kind == "regex":
            assert re.fullmatch(EMAIL, text), (seed, text)
        elif kind == "json_schema":
            jsonschema.validate(json.loads(text), SCHEMA)
        elif kind == "choice":
            assert text in COLOURS, (seed, text)
        else:
            assert re.fullmatch(r"[1-9][0-9]{0,2}([-+*][1-9][0-9]{0,2}){0,3}", text), (seed, text)
    expected = hf_generate(tiny_with_tokenizer.model, plain_prompt, plain_params)
    assert all(list(future.result(timeout=60).token_ids) == expected for future in plain)


def test_choice_ends_with_its_own_finish_reason_and_samples_differ(server) -> None:
    texts = set()
    for seed in range(8):
        response = server.stub.Generate(_constrained(seed, choice=pb.Choices(choices=["alpha", "beta", "gamma"])))
        assert response.finish_reason == pb.CONSTRAINT_COMPLETE
        texts.add(response.text)
    assert texts <= {"alpha", "beta", "gamma"} and len(texts) > 1


def test_greedy_regex_equals_generate_with_prefix_allowed_tokens_fn(server, tiny_with_tokenizer) -> None:
    """The reference is HF's own constrained decoding, fed the same grammar's allowed tokens step by step."""
    prompt = [33, 34, 35]
    tokenizer = llguidance.hf.from_tokenizer(tiny_with_tokenizer.tokenizer, n_vocab=320)
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex(EMAIL), log_level=0)
    bitmask = llguidance.torch.allocate_token_bitmask(1, 320)

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        generated = input_ids[len(prompt) :].tolist()
        if generated:
            assert matcher.consume_token(generated[-1])
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask)
        bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        return bits.flatten()[:320].nonzero().flatten().tolist()

    expected = _hf_constrained(tiny_with_tokenizer.model, prompt, 30, allowed)
    request = ids_request(prompt, max_new_tokens=30)
    request.constraint.regex = EMAIL
    plain = server.stub.Generate.future(ids_request([70, 71], max_new_tokens=30))
    response = server.stub.Generate(request)
    generated = list(response.token_ids)
    # HF keeps going until its max: the grammar then allows only eos. genserve ends when the grammar completes.
    assert generated == expected[: len(generated)]
    assert all(token == TINY_EOS for token in expected[len(generated) :])
    assert re.fullmatch(EMAIL, response.text)
    assert plain.result(timeout=30).token_ids


def test_allowed_token_ids_equal_generate_with_the_same_restriction(server, tiny_with_tokenizer) -> None:
    prompt, allowed = [90, 91, 92], [TINY_EOS, 50, 51, 52, 53, 150, 151]
    request = ids_request(prompt, max_new_tokens=20)
    request.constraint.allowed_token_ids.ids.extend(allowed)
    plain = server.stub.Generate.future(ids_request(prompt, max_new_tokens=20))
    response = server.stub.Generate(request)
    expected = _hf_constrained(tiny_with_tokenizer.model, prompt, 20, lambda batch_id, ids: allowed)
    assert list(response.token_ids) == expected
    assert set(response.token_ids) <= set(allowed)
    params = server.engine.make_parameters(max_new_tokens=20)
    assert list(plain.result(timeout=30).token_ids) == hf_generate(tiny_with_tokenizer.model, prompt, params)


@pytest.mark.parametrize(
    ("constraint", "field"),
    [
        (dict(regex="(("), "regex"),
        (dict(json_schema="{not json"), "json_schema"),
        (dict(grammar="start: undefined_rule"), "grammar"),
        (dict(choice=pb.Choices()), "choice"),
        (dict(allowed_token_ids=pb.TokenIds(ids=[5, 100000])), "allowed_token_ids"),
        (dict(), "constraint"),
    ],
)
def test_bad_constraints_are_invalid_argument_naming_the_field(server, constraint, field) -> None:
    request = ids_request([5, 6], max_new_tokens=4)
    request.constraint.CopyFrom(pb.Constraint(**constraint))
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(field), error.value.details()
    assert server.stub.Generate(ids_request([5, 6], max_new_tokens=3)).token_ids


def test_compiled_grammars_are_cached(server, monkeypatch) -> None:
    compiler = server.engine.grammars
    compiled = []
    compile_once = compiler._compile
    monkeypatch.setattr(
        compiler, "_compile", lambda constraint: compiled.append(constraint) or compile_once(constraint)
    )
    first = compiler.matcher(Constraint("regex", r"[0-9]{4}"))
    second = compiler.matcher(Constraint("regex", r"[0-9]{4}"))
    assert compiled == [Constraint("regex", r"[0-9]{4}")]  # the second request found it compiled
    assert first is not second  # each request advances its own copy
    assert first.consume_tokens(compiler._llg_tokenizer().tokenize_str("12")) and not second.is_accepting()
    compiler.matcher(Constraint("regex", r"[a-z]{2}"))
    assert len(compiled) == 2


def test_a_model_without_tokenizer_takes_only_allowed_token_ids(tiny) -> None:
    running = ServerThread(tiny, max_running=2)
    try:
        request = ids_request([5, 6], max_new_tokens=4)
        request.constraint.regex = "[a-z]+"
        with pytest.raises(grpc.RpcError) as error:
            running.stub.Generate(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request = ids_request([5, 6], max_new_tokens=4)
        request.constraint.allowed_token_ids.ids.extend([7, 8])
        assert set(running.stub.Generate(request).token_ids) <= {7, 8}
    finally:
        running.close()


def test_processed_logprobs_are_the_distribution_sampled_from(server, tiny_with_tokenizer) -> None:
    """HF's `output_scores` are the processed (warped) scores; with the same seed, the same draws."""
    prompt = [100, 101, 102]
    request = ids_request(prompt, max_new_tokens=10, do_sample=True, seed=7, temperature=0.7, top_k=5)
    request.top_logprobs = 5
    request.logprobs_mode = pb.PROCESSED_LOGPROBS
    raw = pb.GenerateRequest()
    raw.CopyFrom(request)
    raw.logprobs_mode = pb.RAW_LOGPROBS
    raw_future = server.stub.Generate.future(raw)
    response = server.stub.Generate(request)
    torch.manual_seed(7)
    with torch.inference_mode():
        reference = tiny_with_tokenizer.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=True,
            temperature=0.7,
            top_k=5,
            eos_token_id=TINY_EOS,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert list(response.token_ids) == reference.sequences[0, len(prompt) :].tolist()
    expected = torch.log_softmax(torch.cat(reference.scores).float(), dim=-1)
    for step, item in enumerate(response.logprobs):
        assert abs(item.logprob - expected[step, item.token_id].item()) < 1e-4
        top_values, top_ids = expected[step].topk(5)
        assert [t.token_id for t in item.top] == top_ids.tolist()
        assert max(abs(t.logprob - v) for t, v in zip(item.top, top_values.tolist())) < 1e-4
    raw_response = raw_future.result(timeout=30)
    assert list(raw_response.token_ids) == list(response.token_ids)
    # The raw distribution keeps tokens top-k removed: its 5th alternative is finite, below the processed one.
    assert all(lp.top[4].logprob > float("-inf") for lp in raw_response.logprobs)
    assert any(r.logprob < p.logprob for r, p in zip(raw_response.logprobs, response.logprobs))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(["regex", "json_schema", "grammar", "choice"]),
    text=st.one_of(
        st.text(max_size=40),
        st.sampled_from(['{"type": "integer"', "[a-z", "start: a\na: a", '{"type": 5}', "root ::= x", "(?P<", ".*"]),
    ),
)
def test_fuzzed_constraints_are_served_or_refused_clearly(server, kind, text) -> None:
    constraint = pb.Constraint(choice=pb.Choices(choices=[text])) if kind == "choice" else pb.Constraint(**{kind: text})
    request = ids_request([5, 6], max_new_tokens=8)
    request.constraint.CopyFrom(constraint)
    try:
        server.stub.Generate(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"


def test_after_fuzzed_constraints_the_server_is_exact(server, tiny_with_tokenizer) -> None:
    params = server.engine.make_parameters(max_new_tokens=12)
    response = server.stub.Generate(ids_request([9, 8, 7], max_new_tokens=12))
    assert list(response.token_ids) == hf_generate(tiny_with_tokenizer.model, [9, 8, 7], params)
    assert server.engine.runner.num_slots == 0
