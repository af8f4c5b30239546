"""The standard protocols, driven by the real third-party clients: `tritonclient.grpc` (KServe v2 / Triton) and
the TGIS stubs shipped in `caikit-tgis-backend`. They need protobuf < 7, so they run in .venv-clients (built by
`make test`) as subprocesses, against a genserve server whose genserve.v1 answers are the reference."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from genserve.scheduler.core.request import FinishReason
from genserve.scheduler.model.loader import LoadedModel
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import byte_tokenizer, tiny_model
from tests.lora_adapters import save_adapter
from tests.serving import ServerThread, wait_for

# `make test-latest` points this at its unpinned clients' environment.
CLIENTS_PYTHON = Path(
    os.environ.get(
        "GENSERVE_CLIENTS_PYTHON", Path(__file__).resolve().parent.parent / ".venv-clients" / "bin" / "python"
    )
)
SCRIPTS = Path(__file__).resolve().parent / "clients"
PROMPTS = ["The quick brown fox", "Once upon a time", "genserve speaks three protocols"]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_with_tokenizer):
    running = ServerThread(tiny_with_tokenizer, max_running=8)
    yield running
    running.close()


def _run_client(script: str, *arguments: str) -> dict:
    if not CLIENTS_PYTHON.exists():
        raise AssertionError(f"{CLIENTS_PYTHON} is missing: `make test` builds the clients' environment")
    result = subprocess.run(
        [str(CLIENTS_PYTHON), str(SCRIPTS / script), *arguments], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _native(server: ServerThread, prompt: str, **parameters: object) -> pb.GenerateResponse:
    request = pb.GenerateRequest(text=prompt, parameters=pb.GenerationParameters(**parameters))
    return server.stub.Generate(request)


def test_triton_client(server) -> None:
    model = server.engine.loaded.name
    scenario = {"prompts": PROMPTS, "sampling": {"max_tokens": MAX_NEW_TOKENS, "temperature": 0}, "long_tokens": 400}
    report = _run_client("triton_client.py", server.target, model, json.dumps(scenario))
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server_name"] == "genserve" and "text_input" in report["model_inputs"]
    native = [_native(server, prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False) for prompt in PROMPTS]
    assert report["unary"] == [response.text for response in native]
    assert report["unary_with_prompt"] == PROMPTS[0] + native[0].text  # exclude_input_in_output is false by default
    assert report["finish_reason"] in ("length", "stop")
    assert report["num_input_tokens"] == native[0].usage.prompt_tokens
    assert report["num_output_tokens"] == native[0].usage.generated_tokens
    assert report["streamed"] == {"s0": native[0].text, "s1": native[1].text}
    assert report["finals"] == {"s0": 1, "s1": 1}
    assert min(report["stream_messages"].values()) > 1
    assert report["interleaved"]  # both prompts streamed on one stream at once, not one after the other
    assert wait_for(lambda: server.engine.num_running == 0 and server.engine.num_waiting == 0, timeout=60)
    # The cancelled stream ended in the engine, early: left to run it would end LENGTH at its 400 tokens.
    assert server.engine_finishes["c"] is FinishReason.CANCELLED
    assert 3 <= server.engine_tokens["c"] < 400


def test_tgis_client(server) -> None:
    native = [_native(server, prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False) for prompt in PROMPTS]
    reference = native[0].text
    stop = next(reference[i : i + 2] for i in range(2, len(reference) - 2) if reference[i : i + 2].isprintable())
    scenario = {
        "prompts": PROMPTS,
        "max_new_tokens": MAX_NEW_TOKENS,
        "stop_sequence": stop,
        "choices": ["yes", "no", "maybe"],
    }
    report = _run_client("tgis_client.py", server.target, json.dumps(scenario))
    assert report["batch"] == [response.text for response in native]
    assert report["batch_counts"] == [[r.usage.prompt_tokens, r.usage.generated_tokens] for r in native]
    assert report["stream_text"] == reference
    assert report["stream_first_input_tokens"] == native[0].usage.prompt_tokens
    assert report["stream_final_stop_reason"] in ("MAX_TOKENS", "EOS_TOKEN") and report["stream_messages"] > 2
    # include_stop_sequence is true when unset, as in TGIS: the text ends with the stop sequence.
    cut = reference.index(stop) + len(stop)
    assert report["stop"] == {"text": reference[:cut], "reason": "STOP_SEQUENCE", "sequence": stop}
    assert report["choice"] in scenario["choices"]
    sampled = report["sampled"]
    assert sampled["seed"] > 0 and sampled["tokens"] == 8 and sampled["logprobs_negative"]
    assert all(rank >= 1 for rank in sampled["ranks"]) and sampled["top_tokens"] == [2] * 8
    tokenizer = server.engine.loaded.tokenizer
    assert report["token_counts"] == [len(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    assert report["model_info"] == ["DECODER_ONLY", server.engine.config.max_context]
    assert report["bad"][0] == "INVALID_ARGUMENT" and "top_n_tokens" in report["bad"][1]


@pytest.fixture(scope="module")
def adapter_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - (server, adapter name)
    """A server of its own model, with one LoRA adapter of it (all projections, rank 8)."""
    model = tiny_model(seed=5)
    folder = save_adapter(
        model, tmp_path_factory.mktemp("adapter") / "tuned", 8, 16, ["q_proj", "v_proj", "up_proj"], 9
    )
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), name="tiny-with-adapter")
    running = ServerThread(loaded, max_running=8, lora_modules=(("tuned", str(folder)),))
    yield running, "tuned"
    running.close()


def test_real_clients_select_adapters_and_equal_the_native_api(adapter_server) -> None:
    server, adapter = adapter_server

    def native(prompt: str, adapter: str) -> str:
        parameters = pb.GenerationParameters(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return server.stub.Generate(pb.GenerateRequest(text=prompt, parameters=parameters, adapter=adapter)).text

    adapted = [native(prompt, adapter) for prompt in PROMPTS]
    assert adapted != [native(prompt, "") for prompt in PROMPTS]  # the guard: the adapter changes the text
    scenario = {"prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS, "adapter": adapter}
    tgis = _run_client("tgis_client.py", server.target, json.dumps(scenario))
    assert tgis["batch"] == adapted and tgis["stream"] == adapted[0]
    assert tgis["unknown"][0] == "NOT_FOUND" and "no-such-adapter" in tgis["unknown"][1]
    scenario["sampling"] = {"max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    triton = _run_client("triton_client.py", server.target, server.engine.loaded.name, json.dumps(scenario))
    assert triton["unary"] == adapted and triton["streamed"] == adapted[0]
    assert triton["unknown"][0] == "StatusCode.NOT_FOUND" and "no-such-adapter" in triton["unknown"][1]


def test_protocols_are_listed_by_reflection_and_health(server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    listed = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    names = {service.name for service in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "fmaas.GenerationService", "genserve.v1.TextGeneration"} <= names
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("inference.GRPCInferenceService", "fmaas.GenerationService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=name)).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_tgis_errors_name_the_field(server) -> None:
    from genserve.service.proto_gen.fmaas import generation_pb2 as tgis
    from genserve.service.proto_gen.fmaas import generation_pb2_grpc

    stub = generation_pb2_grpc.GenerationServiceStub(server.channel)
    cases = {
        "params.decoding.length_penalty": tgis.Parameters(
            decoding=tgis.DecodingParameters(length_penalty=tgis.DecodingParameters.LengthPenalty(start_index=2))
        ),
        "params.sampling.temperature": tgis.Parameters(
            method=tgis.GREEDY, sampling=tgis.SamplingParameters(temperature=0.5)
        ),
    }
    for field, params in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text="hi")], params=params))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.value.details()
    for call, request in (
        (stub.Generate, tgis.BatchedGenerationRequest(adapter_id="lora", requests=[tgis.GenerationRequest(text="hi")])),
        (stub.Tokenize, tgis.BatchedTokenizeRequest(adapter_id="lora", requests=[tgis.TokenizeRequest(text="hi")])),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'lora'" in error.value.details()


def test_kserve_errors(server) -> None:
    from genserve.service.proto_gen.inference import grpc_service_pb2 as kpb
    from genserve.service.proto_gen.inference import grpc_service_pb2_grpc

    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    text = kpb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"hi"])
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(kpb.ModelInferRequest(model_name="other", inputs=[text]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    params = kpb.ModelInferRequest.InferInputTensor(
        name="sampling_parameters",
        datatype="BYTES",
        shape=[1],
        contents=kpb.InferTensorContents(bytes_contents=[b'{"max_tokens": 4, "best_of": 3}']),
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(kpb.ModelInferRequest(model_name=server.engine.loaded.name, inputs=[text, params]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling_parameters.best_of" in error.value.details()
    # A failing request on a stream is its own error_message; the next one on the same stream still answers.
    good = kpb.ModelInferRequest(model_name=server.engine.loaded.name, id="ok", inputs=[text])
    bad = kpb.ModelInferRequest(model_name=server.engine.loaded.name, id="bad", inputs=[text, params])
    responses = list(stub.ModelStreamInfer(iter([bad, good])))
    errors = {r.infer_response.id: r.error_message for r in responses if r.error_message}
    assert list(errors) == ["bad"] and "best_of" in errors["bad"]
    assert any(r.infer_response.id == "ok" and not r.error_message for r in responses)


def test_protocol_calls_carry_load_reports(server) -> None:
    from genserve.service.ops.load_report import APPLICATION_TRAILER_KEY
    from genserve.service.proto_gen.fmaas import generation_pb2 as tgis
    from genserve.service.proto_gen.fmaas import generation_pb2_grpc
    from genserve.service.proto_gen.inference import grpc_service_pb2 as kpb
    from genserve.service.proto_gen.inference import grpc_service_pb2_grpc

    text = kpb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1], contents=kpb.InferTensorContents(bytes_contents=[b"hi"])
    )
    kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel)
    _, call = kserve.ModelInfer.with_call(kpb.ModelInferRequest(model_name=server.engine.loaded.name, inputs=[text]))
    assert APPLICATION_TRAILER_KEY in dict(call.trailing_metadata())
    tgis_stub = generation_pb2_grpc.GenerationServiceStub(server.channel)
    request = tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text="hi")])
    _, call = tgis_stub.Generate.with_call(request)
    assert APPLICATION_TRAILER_KEY in dict(call.trailing_metadata())
