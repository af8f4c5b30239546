"""The real default model over gRPC: chat input, greedy parity, and streaming text that is always whole characters."""

from __future__ import annotations

import pytest

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import hf_generate
from tests.serving import ServerThread

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def server(default_model):
    running = ServerThread(default_model, max_running=4)
    yield running
    running.close()


def _chat(content: str, **parameters) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)])
    return pb.GenerateRequest(
        messages=messages, parameters=pb.GenerationParameters(**parameters), return_token_ids=True
    )


def test_chat_greedy_equals_generate_and_stream_equals_unary(server, default_model) -> None:
    request = _chat("Name two planets of the solar system.", max_new_tokens=30)
    response = server.stub.Generate(request)
    prompt = list(server.stub.Tokenize(pb.TokenizeRequest(messages=request.messages)).token_ids)
    assert response.usage.prompt_tokens == len(prompt)
    params = server.engine.make_parameters(max_new_tokens=30)
    assert list(response.token_ids) == hf_generate(default_model.model, prompt, params)
    chunks = list(server.stub.GenerateStream(request))
    assert "".join(c.text for c in chunks) == response.text
    assert response.text == default_model.tokenizer.decode(response.token_ids, skip_special_tokens=True)


def test_chinese_and_emoji_stream_joins_to_unary_text(server, default_model) -> None:
    # A completion prompt the model continues in Chinese with emoji, several byte-level tokens per character.
    prompt = "中文：我爱北京天安门🎉🎉\n中文：我爱北京天安门🎉🎉\n中文："
    request = pb.GenerateRequest(text=prompt, parameters=pb.GenerationParameters(max_new_tokens=40))
    response = server.stub.Generate(request)
    chunks = list(server.stub.GenerateStream(request))
    deltas = [c.text for c in chunks]
    assert "".join(deltas) == response.text
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # a str holding a lone surrogate would fail here
    assert any(ord(ch) > 0x2E80 for ch in response.text), "needs CJK or emoji output to test anything"


def test_stop_string_over_grpc(server) -> None:
    free = server.stub.Generate(_chat("Count from one to ten in words.", max_new_tokens=40))
    stop = free.text[10:14]
    response = server.stub.Generate(_chat("Count from one to ten in words.", max_new_tokens=40, stop_strings=[stop]))
    assert response.finish_reason == pb.STOP_STRING and response.stop_string == stop
    assert response.text == free.text[: free.text.index(stop)]
    streamed = "".join(
        c.text
        for c in server.stub.GenerateStream(
            _chat("Count from one to ten in words.", max_new_tokens=40, stop_strings=[stop])
        )
    )
    assert streamed == response.text


def test_tokenize_offsets_and_unknown_role(server) -> None:
    import grpc

    response = server.stub.Tokenize(pb.TokenizeRequest(text="Hello world", return_offsets=True))
    assert len(response.offsets) == len(response.token_ids) >= 2
    assert response.offsets[-1].end == len("Hello world")
    bad = pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="hi")])
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(pb.GenerateRequest(messages=bad))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "role" in error.value.details()


def test_node_client_streams_text(server) -> None:
    import json
    import shutil
    import subprocess
    from pathlib import Path

    interop = Path(__file__).parent / "interop"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js is not installed on this machine")
    if not (interop / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=interop, check=True, capture_output=True, timeout=300
        )
    result = subprocess.run(
        ["node", "client.js", server.target, "What is the capital of France?", "20"],
        cwd=interop,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["tokens"] >= 1 and summary["finish_reason"] in ("LENGTH", "EOS_TOKEN")
    assert "Paris" in summary["text"]
    unary = server.stub.Generate(_chat("What is the capital of France?", max_new_tokens=20))
    assert summary["text"] == unary.text


def test_json_schema_answers_validate_and_speculation_keeps_parity(server) -> None:
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    questions = ["What is the capital of France?", "Name a large city in Japan.", "Which city hosts the Colosseum?"]
    futures = []
    for question in questions:
        request = _chat(f"{question} Answer in JSON with the city and its population.", max_new_tokens=60)
        request.constraint.json_schema = json.dumps(schema)
        futures.append(server.stub.Generate.future(request))
    plain = _chat(
        "Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox.", max_new_tokens=40
    )
    reference = server.stub.Generate.future(plain)
    plain.parameters.prompt_lookup_num_tokens = 4
    speculative = server.stub.Generate(plain)
    for future in futures:
        response = future.result(timeout=120)
        assert response.finish_reason == pb.CONSTRAINT_COMPLETE, response.text
        jsonschema.validate(json.loads(response.text), schema)
    assert list(speculative.token_ids) == list(reference.result(timeout=60).token_ids)
