"""Under cancels, disconnects, malformed input and injected faults the server keeps serving and leaks nothing.

Every load here is bounded in count and time and goes to a server on 127.0.0.1 only.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from tests.conftest import TINY_VOCAB, hf_generate
from tests.serving import ServerThread, ids_request

ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def server(tiny):
    running = ServerThread(tiny, max_running=8, max_queue=512)
    yield running
    running.close()


def _wait_idle(server: ServerThread, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine.num_running == 0 and server.engine.num_waiting == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {server.engine.num_running} running, {server.engine.num_waiting} waiting")


def _assert_healthy_after(server: ServerThread, tiny) -> None:
    """The server still gives exactly the tokens generate() gives."""
    prompt = [9, 8, 7, 6]
    response = server.stub.Generate(ids_request(prompt, max_new_tokens=10))
    assert list(response.token_ids) == hf_generate(tiny.model, prompt, server.engine.make_parameters(max_new_tokens=10))


def test_cancel_and_disconnect_storm_leave_nothing_behind(server, tiny) -> None:
    rng = random.Random(0)
    idle_kv = server.engine.runner.kv_usage_ratio()
    plans = [(rng.randint(0, 12), rng.random() < 0.5) for _ in range(240)]

    def storm(plan: tuple[int, bool]) -> None:
        chunks_before_leaving, disconnect = plan
        channel = grpc.insecure_channel(server.target) if disconnect else server.channel
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        # Plain, guided (a companion row each) and speculating rows: every kind must leave nothing behind.
        extra = [{}, dict(guidance_scale=2.0), dict(prompt_lookup_num_tokens=4)][chunks_before_leaving % 3]
        stream = stub.GenerateStream(
            ids_request([rng.randrange(3, TINY_VOCAB)] * 5, max_new_tokens=200, ignore_eos=True, **extra)
        )
        try:
            for _, _chunk in zip(range(chunks_before_leaving), stream):
                pass
        except grpc.RpcError as error:
            assert error.code() in ALLOWED_CODES | {grpc.StatusCode.CANCELLED}
        if disconnect:
            channel.close()  # the client vanishes without a cancel of its own
        else:
            stream.cancel()

    with ThreadPoolExecutor(max_workers=24) as pool:
        list(pool.map(storm, plans))
    _wait_idle(server)
    assert server.engine.runner.num_slots == 0  # no orphaned guidance companion
    assert server.engine.runner.kv_usage_ratio() == idle_kv == 0.0
    assert not server.server.service.in_flight
    assert server.server.async_engine.num_streams == 0
    _assert_healthy_after(server, tiny)


def _raw_request(text_bytes: bytes) -> bytes:
    """A GenerateRequest whose `text` field holds arbitrary bytes, which protobuf can't build but a client can send."""
    return b"\x0a" + _varint(len(text_bytes)) + text_bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_undecodable_bytes_are_invalid_argument(server, tiny) -> None:
    call = server.channel.unary_unary("/genserve.v1.TextGeneration/Generate")
    for payload in (_raw_request(b"\xff\xfe bad utf-8 \xc3"), b"\x0a\xff\xff\xff", b"\x12\x05\x08"):
        with pytest.raises(grpc.RpcError) as error:
            call(payload)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    _assert_healthy_after(server, tiny)


_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300, math.nan, -1.0, 2.0])
)
_ints = st.one_of(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from([0, -1, 1, 2**31, 50, 2048]))
_parameters = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": _ints,
        "min_new_tokens": _ints,
        "do_sample": st.booleans(),
        "temperature": _numbers,
        "top_k": _ints,
        "top_p": _numbers,
        "min_p": _numbers,
        "typical_p": _numbers,
        "repetition_penalty": _numbers,
        "no_repeat_ngram_size": _ints,
        "max_time": _numbers,
        "seed": st.integers(min_value=0, max_value=2**64 - 1),
        "ignore_eos": st.booleans(),
        "eos_token_id": st.lists(_ints, max_size=40),
        "stop_strings": st.lists(st.text(max_size=20), max_size=5),
        "presence_penalty": _numbers,
        "frequency_penalty": _numbers,
        "guidance_scale": _numbers,
        "prompt_lookup_num_tokens": _ints,
        "num_assistant_tokens": _ints,
    },
)
_constraints = st.one_of(
    st.none(),
    st.builds(lambda ids: pb.Constraint(allowed_token_ids=pb.TokenIds(ids=ids)), st.lists(_ints, max_size=20)),
    st.builds(lambda text: pb.Constraint(regex=text), st.text(max_size=30)),
    st.builds(lambda text: pb.Constraint(json_schema=text), st.text(max_size=30)),
    st.builds(lambda items: pb.Constraint(choice=pb.Choices(choices=items)), st.lists(st.text(max_size=8), max_size=4)),
    st.just(pb.Constraint()),
)
_inputs = st.one_of(
    st.builds(lambda ids: {"input_ids": pb.TokenIds(ids=ids)}, st.lists(_ints, max_size=3000)),
    st.builds(lambda ids: {"input_ids": pb.TokenIds(ids=ids)}, st.lists(st.integers(0, TINY_VOCAB - 1), max_size=50)),
    st.builds(lambda t: {"text": t}, st.text(max_size=200)),
    st.builds(
        lambda msgs: {"messages": pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in msgs])},
        st.lists(st.tuples(st.sampled_from(["user", "system", "", "robot"]), st.text(max_size=30)), max_size=3),
    ),
    st.just({}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    inputs=_inputs,
    parameters=_parameters,
    bad_words=st.lists(st.lists(_ints, max_size=4), max_size=5),
    truncate=st.one_of(st.none(), _ints),
    top_logprobs=st.integers(0, 40),
    constraint=_constraints,
    negative=st.one_of(st.none(), st.lists(_ints, max_size=20)),
    processed=st.booleans(),
)
def test_fuzzed_requests_get_ok_or_a_clear_refusal(
    server, inputs, parameters, bad_words, truncate, top_logprobs, constraint, negative, processed
) -> None:
    message = pb.GenerationParameters()
    for name, value in parameters.items():
        try:
            if isinstance(value, list):
                getattr(message, name).extend(value)
            else:
                setattr(message, name, value)
        except (ValueError, TypeError):
            pass  # out of the field's wire range: protobuf itself refuses to send it
    for words in bad_words:
        message.bad_words_ids.append(pb.TokenIds(ids=words))
    request = pb.GenerateRequest(parameters=message, top_logprobs=top_logprobs, **inputs)
    if truncate is not None:
        request.truncate_prompt_tokens = truncate
    if constraint is not None:
        request.constraint.CopyFrom(constraint)
    if negative is not None:
        try:
            request.negative_input_ids.ids.extend(negative)
        except ValueError:
            pass
    request.logprobs_mode = pb.PROCESSED_LOGPROBS if processed else pb.RAW_LOGPROBS
    try:
        server.stub.Generate(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() in ALLOWED_CODES, f"{error.code()}: {error.details()} for {request}"


def test_after_fuzzing_the_server_serves_correctly(server, tiny) -> None:
    _wait_idle(server)
    _assert_healthy_after(server, tiny)


def test_failure_in_one_requests_prefill_fails_only_thatids_request(tiny, monkeypatch) -> None:
    isolated = ServerThread(tiny, max_running=8)
    poison = 313
    runner = isolated.engine.runner
    original = runner.model.get_decoder().forward

    def forward(input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if (input_ids == poison).any():
            raise ValueError("injected fault for this request")
        return original(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(runner.model.get_decoder(), "forward", forward)
    try:
        prompts = [[5, 6, 7 + i] for i in range(6)]
        futures = [isolated.stub.Generate.future(ids_request(p, max_new_tokens=30)) for p in prompts[:3]]
        with pytest.raises(grpc.RpcError) as error:
            isolated.stub.Generate(ids_request([5, poison, 7], max_new_tokens=30))
        assert error.value.code() == grpc.StatusCode.INTERNAL and "injected fault" in error.value.details()
        futures += [isolated.stub.Generate.future(ids_request(p, max_new_tokens=30)) for p in prompts[3:]]
        for prompt, future in zip(prompts, futures):
            expected = hf_generate(tiny.model, prompt, isolated.engine.make_parameters(max_new_tokens=30))
            assert list(future.result(timeout=60).token_ids) == expected
    finally:
        isolated.close()


def test_out_of_memory_is_survived(tiny, monkeypatch) -> None:
    survivor = ServerThread(tiny, max_running=8)
    runner = survivor.engine.runner
    original = runner._decode
    injected = threading.Event()

    def decode(num_rows: int, *args: object) -> tuple[torch.Tensor, dict]:
        if num_rows >= 4 and not injected.is_set():
            injected.set()
            raise torch.OutOfMemoryError("injected: out of memory")
        return original(num_rows, *args)

    monkeypatch.setattr(runner, "_decode", decode)
    try:
        prompts = [[11 + i, 12, 13] for i in range(6)]
        futures = [survivor.stub.Generate.future(ids_request(p, max_new_tokens=40, ignore_eos=True)) for p in prompts]
        results = [future.result(timeout=120) for future in futures]
        assert injected.is_set()
        assert all(r.usage.generated_tokens == 40 and r.finish_reason == pb.LENGTH for r in results)
        assert survivor.engine.snapshot.row_limit < 8  # admission shrank to what fit
        _wait_idle(survivor)
    finally:
        survivor.close()
