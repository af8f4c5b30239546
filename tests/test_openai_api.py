"""The OpenAI-compatible HTTP API, driven by the real `openai` SDK (sync and async, streaming and not) against a
live server, with genserve.v1 over gRPC as the reference."""

from __future__ import annotations

import asyncio
import json

import grpc
import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genserve.scheduler.model.loader import LoadedModel
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.server import ServerOptions
from tests.conftest import byte_tokenizer
from tests.serving import ServerThread, wait_for

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|>{{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["The quick brown fox", "Once upon a time"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_model(tiny) -> LoadedModel:
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return LoadedModel(model=tiny.model, tokenizer=tokenizer, name="tiny-chat")


@pytest.fixture(scope="module")
def server(chat_model):
    running = ServerThread(chat_model, http=True, metrics=True, max_running=8)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0)


def _native(server: ServerThread, **fields: object) -> pb.GenerateResponse:
    parameters = fields.pop("parameters", {})
    return server.stub.Generate(pb.GenerateRequest(parameters=pb.GenerationParameters(**parameters), **fields))


def _native_chat(server: ServerThread, max_new_tokens: int) -> pb.GenerateResponse:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(**message) for message in MESSAGES])
    return _native(server, messages=messages, parameters=dict(max_new_tokens=max_new_tokens, do_sample=False))


def test_greedy_completions_and_chat_equal_the_native_api(server, client) -> None:
    model = server.engine.loaded.name
    for prompt in PROMPTS:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
        native = _native(server, text=prompt, parameters=dict(max_new_tokens=20, do_sample=False))
        assert answer.choices[0].text == native.text and answer.object == "text_completion"
        assert answer.usage.completion_tokens == native.usage.generated_tokens
        assert answer.usage.prompt_tokens == native.usage.prompt_tokens
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == _native_chat(server, 16).text
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    # A list of prompts answers prompt by prompt.
    many = client.completions.create(model=model, prompt=PROMPTS, max_tokens=8, temperature=0)
    singles = [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0) for p in PROMPTS]
    assert [c.text for c in many.choices] == [s.choices[0].text for s in singles]
    assert [c.index for c in many.choices] == [0, 1]


def test_streamed_deltas_join_to_the_unary_text(server, client) -> None:
    model = server.engine.loaded.name
    unary = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=24, temperature=0)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPTS[0],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert text == unary.choices[0].text
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == [unary.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == unary.usage.completion_tokens
    chat_unary = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0, stream=True)
    chat_chunks = list(stream)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    joined = "".join(chunk.choices[0].delta.content or "" for chunk in chat_chunks if chunk.choices)
    assert joined == chat_unary.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason == chat_unary.choices[0].finish_reason
    assert all(chunk.object == "chat.completion.chunk" for chunk in chat_chunks)


def test_the_async_client_streams_concurrent_requests(server) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0) as client:

            async def one(prompt: str) -> str:
                stream = await client.completions.create(
                    model=server.engine.loaded.name, prompt=prompt, max_tokens=12, temperature=0, stream=True
                )
                return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

            return await asyncio.gather(*[one(prompt) for prompt in PROMPTS * 2])

    texts = asyncio.run(main())
    expected = [_native(server, text=p, parameters=dict(max_new_tokens=12, do_sample=False)).text for p in PROMPTS]
    assert texts == expected * 2


def test_n_samples_with_a_seed_are_reproducible(server, client) -> None:
    def draw() -> list[str]:
        answer = client.completions.create(
            model=server.engine.loaded.name, prompt=PROMPTS[1], max_tokens=16, temperature=1.0, n=2, seed=7
        )
        return [choice.text for choice in answer.choices]

    first = draw()
    assert draw() == first and len(first) == 2 and first[0] != first[1]


def test_a_json_schema_response_format_gives_valid_json(server, client) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = client.chat.completions.create(
        model=server.engine.loaded.name,
        messages=MESSAGES,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(answer.choices[0].message.content)["ok"], bool)


def test_logprobs_agree_with_the_native_api(server, client) -> None:
    model = server.engine.loaded.name
    answer = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    native = _native(
        server,
        text=PROMPTS[0],
        parameters=dict(max_new_tokens=6, do_sample=False),
        return_logprobs=True,
        top_logprobs=2,
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([item.logprob for item in native.logprobs])
    # Keyed by token text, as OpenAI's completions format is: two byte tokens that decode alike share a key.
    for top, item in zip(logprobs.top_logprobs, native.logprobs):
        assert 1 <= len(top) <= 2
        assert set(top.values()) <= {alternative.logprob for alternative in item.top}
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    reference = _native(
        server,
        messages=pb.ChatMessages(messages=[pb.ChatMessage(**message) for message in MESSAGES]),
        parameters=dict(max_new_tokens=5, do_sample=False),
        return_logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert [item.logprob for item in content] == pytest.approx([item.logprob for item in reference.logprobs])
    assert all(len(item.top_logprobs) == 3 for item in content)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"extra_body": {"no_such_knob": 1}}, "no_such_knob"),
        ({"extra_body": {"tools": [{"type": "function"}]}}, "tools"),
        ({"extra_body": {"best_of": 3}}, "best_of"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"extra_body": {"guided_regex": "a+", "guided_choice": ["a"]}}, "guided_choice"),
    ],
)
def test_a_bad_parameter_is_a_400_naming_it(server, client, overrides: dict, param: str) -> None:
    arguments = dict(model=server.engine.loaded.name, prompt="hi", max_tokens=4) | overrides
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**arguments)
    assert refused.value.status_code == 400 and param in str(refused.value.body["param"])


def test_unknown_model_auth_and_overload_statuses(chat_model) -> None:
    tokens = frozenset({"secret"})
    options = ServerOptions(port=0, http_port=0, auth_tokens=tokens, max_requests_per_client=1)
    server = ServerThread(chat_model, options=options, max_running=4)
    try:
        url = f"{server.http_url}/v1"
        anonymous = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        client = openai.OpenAI(base_url=url, api_key="secret", max_retries=0)
        assert [model.id for model in client.models.list().data] == ["tiny-chat"]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
        assert httpx.get(f"{server.http_url}/health").status_code == 200  # open, as gRPC health is
        # One client, one request in flight: a second is refused with 429 and a retry delay.
        with httpx.Client(timeout=60) as http:
            headers = {"authorization": "Bearer secret"}
            body = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
            with http.stream("POST", f"{url}/completions", json=body, headers=headers) as first:
                assert first.status_code == 200
                second = http.post(f"{url}/completions", json=body | {"stream": False}, headers=headers)
                assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
                assert second.json()["error"]["type"] == "rate_limit_error"
            late = http.post(
                f"{url}/completions",
                json=body | {"stream": False, "max_tokens": 300},
                headers=headers | {"x-request-timeout-ms": "1"},
            )
            assert late.status_code == 504 and late.json()["error"]["type"] == "timeout_error"
            server.server.service.draining = True  # as on SIGTERM
            refused = http.post(f"{url}/completions", json=body | {"stream": False}, headers=headers)
            assert refused.status_code == 503 and http.get(f"{server.http_url}/health").status_code == 503
            server.server.service.draining = False
    finally:
        server.close()


def test_a_disconnect_mid_stream_cancels_the_request(server) -> None:
    body = {"model": "tiny-chat", "prompt": "hi", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.http_url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
    assert wait_for(lambda: server.engine.snapshot.num_running == 0, timeout=30)
    assert server.engine_tokens and max(server.engine_tokens.values()) < 400


def test_tokenize_detokenize_models_and_metrics(server, chat_model) -> None:
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        tokens = http.post("/tokenize", json={"prompt": "hello"}).json()
        assert tokens["tokens"] == chat_model.tokenizer.encode("hello") and tokens["count"] == len(tokens["tokens"])
        assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "hello"
        chat_tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
        assert (
            chat_tokens == chat_model.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
        )
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == server.engine.config.max_context
        metrics = http.get("/metrics").text
        assert "genserve_requests_total" in metrics and 'method="Completions"' in metrics
        broken = http.post("/v1/completions", content=b'{"prompt": "\xff\xfe", "max_tokens": 2}')
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
        assert server.stub.ModelInfo(pb.ModelInfoRequest()).model_name == "tiny-chat"  # gRPC unharmed
    with pytest.raises(grpc.RpcError):
        server.stub.Generate(pb.GenerateRequest(text=""))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "stream",
    "logit_bias",
    "response_format",
    "top_k",
    "guided_json",
    "echo",
    "best_of",
    "tools",
    "unknown_field",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    garbage=st.binary(max_size=40),
)
def test_fuzzed_bodies_get_4xx_and_harm_nothing(server, body: dict, path: str, garbage: bytes) -> None:
    """Wrong types, huge values, unknown fields and broken bytes: a 4xx (or, for a body that happens to be a valid
    request, a 200), never a 5xx; and the server keeps answering."""
    body.setdefault("max_tokens", 2)
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        answer = http.post(path, json=body)
        assert answer.status_code in (200, 400, 404), (body, answer.text)
        if answer.status_code != 200:
            assert answer.json()["error"]["message"]
        raw = http.post(path, content=garbage, headers={"content-type": "application/json"})
        assert 400 <= raw.status_code < 500
    assert server.engine.snapshot.num_running <= server.engine.config.max_running
