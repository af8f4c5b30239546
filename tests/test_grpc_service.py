"""The gRPC service over real channels on a free local port, with the tiny model (token ids in, token ids out)."""

from __future__ import annotations

import importlib.util
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from genserve.scheduler.core.request import FinishReason
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_EOS, TINY_VOCAB, hf_generate
from tests.serving import LONG_CONTEXT, LONG_REQUEST_TOKENS, ServerThread, ids_request, wait_for


@pytest.fixture(scope="module")
def server(tiny):
    running = ServerThread(tiny, max_running=8, max_queue=64, max_context=LONG_CONTEXT)
    yield running
    running.close()


def _prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(3, TINY_VOCAB) for _ in range(rng.randint(1, 40))]


def test_generated_code_is_fresh() -> None:
    # proto/ holds the contracts and the script that compiles them; it is not a package that installs.
    spec = importlib.util.spec_from_file_location("proto_build", Path(__file__).parent.parent / "proto" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert not build.is_stale(), "service/proto_gen is stale: run `make proto`"


def test_unary_and_stream_equal_generate(server, tiny) -> None:
    prompt = [5, 9, 33, 70, 2, 101]
    request = ids_request(prompt, max_new_tokens=25, repetition_penalty=1.2)
    expected = hf_generate(tiny.model, prompt, server.engine.make_parameters(max_new_tokens=25, repetition_penalty=1.2))
    response = server.stub.Generate(request)
    assert list(response.token_ids) == expected
    assert response.usage.prompt_tokens == len(prompt) and response.usage.generated_tokens == len(expected)
    assert response.finish_reason in (pb.LENGTH, pb.EOS_TOKEN)
    chunks = list(server.stub.GenerateStream(request))
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[0].HasField("prompt_tokens") and chunks[0].prompt_tokens == len(prompt)
    assert chunks[-1].finish_reason == response.finish_reason
    assert chunks[-1].usage.generated_tokens == len(expected)
    assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_top_h_sampling_over_grpc_equals_generate(server, tiny) -> None:
    prompt = [5, 9, 33, 70]
    params = dict(max_new_tokens=20, do_sample=True, top_h=0.6, top_k=0, seed=21)
    tokens = list(server.stub.Generate(ids_request(prompt, **params)).token_ids)
    assert tokens == hf_generate(tiny.model, prompt, server.engine.make_parameters(**params))


def test_32_concurrent_streams_with_mixed_parameters(server, tiny) -> None:
    rng = random.Random(3)
    variants = [
        {"max_new_tokens": 20},
        {"max_new_tokens": 15, "no_repeat_ngram_size": 2},
        {"max_new_tokens": 18, "min_new_tokens": 10},
        {"max_new_tokens": 12, "bad_words_ids": [[7], [8, 9]]},
        {"max_new_tokens": 22, "repetition_penalty": 1.4},
        {"max_new_tokens": 16, "eos_token_id": [TINY_EOS, 11, 12]},
    ]
    jobs = [(_prompt(rng), variants[i % len(variants)]) for i in range(32)]

    def run(job):  # noqa: ANN001, ANN202
        prompt, params = job
        time.sleep(rng.random() * 0.2)  # arrivals spread over the first steps
        return [t for chunk in server.stub.GenerateStream(ids_request(prompt, **params)) for t in chunk.token_ids]

    with ThreadPoolExecutor(max_workers=32) as pool:
        outputs = list(pool.map(run, jobs))
    for (prompt, params), output in zip(jobs, outputs):
        assert output == hf_generate(tiny.model, prompt, server.engine.make_parameters(**params)), params
    assert wait_for(lambda: server.engine.num_running == 0)


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 100_000}, "max_new_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"eos_token_id": [TINY_VOCAB + 5]}, "eos_token_id"),
        ({"top_h": 1.5}, "top_h"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(server, parameters: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(ids_request([5, 6, 7], **parameters))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert server.stub.Generate(ids_request([5, 6, 7], max_new_tokens=3)).usage.generated_tokens == 3


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[])), "input"),
        (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, TINY_VOCAB])), "input_ids"),
        (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, -1])), "input_ids"),
        (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5] * (LONG_CONTEXT + 1))), "input"),  # past max_context
        (pb.GenerateRequest(text="hello"), "text"),  # the tiny model has no tokenizer
        (pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5]), truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    ],
)
def test_bad_inputs_are_invalid_argument(server, request_message: pb.GenerateRequest, field: str) -> None:
    for call in (server.stub.Generate, lambda r: list(server.stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as error:
            call(request_message)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert field in error.value.details()


def test_truncate_prompt_tokens_keeps_the_end(server) -> None:
    request = ids_request([7 + i % 300 for i in range(3000)], max_new_tokens=2)
    request.truncate_prompt_tokens = 100
    assert server.stub.Generate(request).usage.prompt_tokens == 100


def test_deadline_frees_the_row(server) -> None:
    request = ids_request([5, 6, 7], "deadline", max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(request, timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: server.engine.num_running == 0 and server.engine.num_waiting == 0, timeout=60)
    # The engine ended it, early: a request left to run would end LENGTH with all its tokens.
    assert server.engine_finishes["deadline"] is FinishReason.CANCELLED
    assert server.engine_tokens["deadline"] < LONG_REQUEST_TOKENS


def test_client_cancel_frees_the_row(server) -> None:
    request = ids_request([5, 6, 7], "cancelled", max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
    stream = server.stub.GenerateStream(request)
    for _, _chunk in zip(range(5), stream):
        pass
    assert server.engine.num_running == 1
    stream.cancel()
    assert wait_for(lambda: server.engine.num_running == 0, timeout=60)
    assert server.engine_finishes["cancelled"] is FinishReason.CANCELLED
    assert 5 <= server.engine_tokens["cancelled"] < LONG_REQUEST_TOKENS


def test_full_queue_is_resource_exhausted_and_others_finish(tiny) -> None:
    small = ServerThread(tiny, max_running=1, max_queue=1)
    try:
        long_request = ids_request([5, 6, 7], max_new_tokens=400, ignore_eos=True)
        running = small.stub.Generate.future(long_request)
        assert wait_for(lambda: small.engine.num_running == 1)
        queued = small.stub.Generate.future(ids_request([8, 9], max_new_tokens=5))
        assert wait_for(lambda: small.engine.num_waiting == 1)
        with pytest.raises(grpc.RpcError) as error:
            small.stub.Generate(ids_request([10, 11], max_new_tokens=5))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert running.result(timeout=60).usage.generated_tokens == 400
        assert queued.result(timeout=60).usage.generated_tokens >= 1
    finally:
        small.close()


def test_health_serving_then_not_serving_on_drain(tiny) -> None:
    draining = ServerThread(tiny, max_running=2, grace_seconds=30)
    health_stub = health_pb2_grpc.HealthStub(draining.channel)
    status = health_stub.Check(health_pb2.HealthCheckRequest(service="genserve.v1.TextGeneration")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    stream = draining.stub.GenerateStream(ids_request([5, 6, 7], max_new_tokens=300, ignore_eos=True))
    first = next(stream)
    drained = draining.drain_in_background()
    assert wait_for(lambda: draining.server.service.draining)
    with pytest.raises(grpc.RpcError) as error:
        draining.stub.Generate(ids_request([5, 6], max_new_tokens=2))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # What Kubernetes' gRPC probe and Envoy's health checks read: the server as a whole and each service.
    for name in ("", "genserve.v1.TextGeneration"):
        status = health_stub.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING, name
    rest = list(stream)  # the in-flight stream runs to completion
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 300
    assert rest[-1].finish_reason == pb.LENGTH
    drained.result(timeout=30)
    draining.close()


def test_reflection_lists_the_service(server) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for response in responses for service in response.list_services_response.service}
    assert {"genserve.v1.TextGeneration", "grpc.health.v1.Health"} <= names


def test_model_info(server) -> None:
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.vocab_size == TINY_VOCAB and info.model_name == "tiny-llama"
    assert list(info.eos_token_ids) == [TINY_EOS]
    assert info.default_parameters.top_k == 50 and info.limits.max_batch_size == 8
    assert not info.prefix_caching and info.assistant_model == ""


def test_logprobs_equal_log_softmax_of_hf_logits(server, tiny) -> None:
    import torch

    prompt = [11, 12, 13, 14, 15]
    request = ids_request(prompt, max_new_tokens=12)
    request.top_logprobs = 5
    plain = server.stub.Generate.future(ids_request([20, 21, 22], max_new_tokens=12))  # a batch-mate without logprobs
    response = server.stub.Generate(request)
    with torch.inference_mode():
        reference = tiny.model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    expected = torch.log_softmax(torch.cat(reference.logits).float(), dim=-1)
    assert len(response.logprobs) == len(response.token_ids) == expected.shape[0]
    for step, (item, token_id) in enumerate(zip(response.logprobs, response.token_ids)):
        assert item.token_id == token_id
        assert abs(item.logprob - expected[step, token_id].item()) < 1e-4
        top_values, top_ids = expected[step].topk(5)
        assert [t.token_id for t in item.top] == top_ids.tolist()
        assert max(abs(t.logprob - v) for t, v in zip(item.top, top_values.tolist())) < 1e-4
        assert item.rank == 1  # greedy: the most likely token
    assert not plain.result(timeout=30).logprobs
    streamed = [lp for chunk in server.stub.GenerateStream(request) for lp in chunk.logprobs]
    assert [lp.token_id for lp in streamed] == [lp.token_id for lp in response.logprobs]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, response.logprobs)) < 1e-5


def test_too_many_top_logprobs_is_invalid(server) -> None:
    request = ids_request([5, 6], max_new_tokens=2)
    request.top_logprobs = 21
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in error.value.details()


def test_metrics_count_requests_tokens_and_errors(tiny) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    metered = ServerThread(tiny, max_running=4, metrics=True)
    try:
        for _ in range(3):
            metered.stub.Generate(ids_request([5, 6, 7], max_new_tokens=6, ignore_eos=True))
        list(metered.stub.GenerateStream(ids_request([5, 6], max_new_tokens=4, ignore_eos=True)))
        with pytest.raises(grpc.RpcError):
            metered.stub.Generate(ids_request([5], temperature=-1.0))
        url = f"http://127.0.0.1:{metered.server.metrics_port}/metrics"
        samples = {}
        for family in text_string_to_metric_families(urllib.request.urlopen(url, timeout=10).read().decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    finally:
        metered.close()

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("genserve_requests_total", method="Generate", finish_reason="length", code="OK") == 3
    assert value("genserve_requests_total", method="GenerateStream", finish_reason="length", code="OK") == 1
    assert value("genserve_requests_total", method="Generate", finish_reason="", code="INVALID_ARGUMENT") == 1
    # The warm-up request counts in the engine's generated tokens but not in the service's request metrics.
    assert value("genserve_generated_tokens_total") == 3 * 6 + 4
    assert value("genserve_prompt_tokens_total") == 3 * 3 + 2
    assert value("genserve_time_to_first_token_seconds_count", priority="interactive") == 4
    assert value("genserve_inter_token_latency_seconds_count") == 3 * 5 + 3
    assert value("genserve_model_info", model="tiny-llama") == 1
    assert value("genserve_running_requests") == 0 and value("genserve_queue_size") == 0
    assert value("genserve_step_duration_seconds_count", phase="prefill") >= 1
    assert value("genserve_queue_wait_seconds_count", priority="interactive") >= 4
    assert value("genserve_prefilled_requests_total") >= 4


def test_logit_bias_and_penalties_apply_only_to_their_rows(server, tiny) -> None:
    prompt = [31, 32, 33]
    forced = ids_request(prompt, max_new_tokens=6)
    forced.parameters.logit_bias[77] = 100.0
    penalised = ids_request(prompt, max_new_tokens=30, frequency_penalty=2.0, presence_penalty=2.0)
    plain = server.stub.Generate.future(ids_request(prompt, max_new_tokens=30))
    assert list(server.stub.Generate(forced).token_ids) == [77] * 6
    penalised_tokens = list(server.stub.Generate(penalised).token_ids)
    expected = hf_generate(tiny.model, prompt, server.engine.make_parameters(max_new_tokens=30))
    assert list(plain.result(timeout=30).token_ids) == expected
    assert penalised_tokens != expected and len(set(penalised_tokens)) > len(set(expected))
    bad = ids_request(prompt, max_new_tokens=3)
    bad.parameters.logit_bias[TINY_VOCAB + 1] = 1.0
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in error.value.details()


def test_sampled_tokens_report_their_rank_in_the_raw_distribution(server, tiny) -> None:
    import torch

    prompt = [31, 32, 33]
    request = ids_request(prompt, max_new_tokens=10, do_sample=True, temperature=3.0, top_k=0, seed=5)
    request.return_logprobs = True
    response = server.stub.Generate(request)
    torch.manual_seed(5)
    with torch.inference_mode():
        reference = tiny.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=10,
            do_sample=True,
            temperature=3.0,
            top_k=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert list(response.token_ids) == reference.sequences[0, len(prompt) :].tolist()
    logprobs = torch.log_softmax(torch.cat(reference.logits).float(), dim=-1)
    ranks = [int((logprobs[step] > logprobs[step, token]).sum()) + 1 for step, token in enumerate(response.token_ids)]
    assert [item.rank for item in response.logprobs] == ranks
    assert max(ranks) > 1  # a hot temperature picks unlikely tokens too
