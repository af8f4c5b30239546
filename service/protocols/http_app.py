"""The HTTP front end (`--http-port`): an ASGI app (FastAPI, served by uvicorn on the gRPC server's asyncio loop)
with the OpenAI-compatible API and vLLM's companions (/v1/completions, /v1/chat/completions, /v1/models, /tokenize,
/detokenize), /health and /metrics.

Every generation goes through the native service (openai_api.py maps the bodies), so admission, per-client
limits, deadlines, metrics and auth are the gRPC protocols'. Errors come back in OpenAI's JSON shape with the
status a client acts on: 400 naming the parameter, 401, 404 for an unknown model, 429 with Retry-After, 503 while
draining, 504 at the deadline. A client that disconnects mid-stream cancels its rows.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from genserve.scheduler import (
    AdapterError,
    AsyncEngine,
    DeadlineUnreachableError,
    EngineDeadError,
    GenerationOutput,
    QueueFullError,
    RequestFailedError,
    UnknownAdapterError,
    ValidationError,
)
from genserve.service.ops.metrics import Metrics
from genserve.service.ops.security import bearer_token_accepted
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.protocols import openai_api as api
from genserve.service.protocols.errors import DrainingError, ModelNotFoundError
from genserve.service.protocols.merged_streams import merged
from genserve.service.protocols.native import TextGenerationService

DEADLINE_HEADER = "x-request-timeout-ms"  # milliseconds the client will wait: the request's deadline, as gRPC's


class _HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclass(frozen=True)
class CallContext:
    """What the native service reads of a gRPC call, from an HTTP request: the deadline, the metadata (headers,
    and the body's `user` as the client id) and the peer."""

    deadline: float | None
    metadata: tuple[tuple[str, str], ...]
    address: str

    @classmethod
    def of(cls, request: Request, user: str | None) -> CallContext:
        deadline = None
        if DEADLINE_HEADER in request.headers:
            try:
                deadline = time.monotonic() + float(request.headers[DEADLINE_HEADER]) / 1000
            except ValueError:
                raise ValidationError(DEADLINE_HEADER, "must be a number of milliseconds") from None
        metadata = tuple(request.headers.items()) + ((("x-client-id", user),) if user else ())
        return cls(deadline, metadata, request.client.host if request.client else "unknown")

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def peer(self) -> str:
        return f"http:{self.address}:0"


# The errors raised on purpose: each has its status (an unexpected one is a 500 from Starlette's own handler).
_KNOWN_ERRORS = (
    ValidationError,
    QueueFullError,
    DrainingError,
    EngineDeadError,
    DeadlineUnreachableError,
    ModelNotFoundError,
    RequestFailedError,
    UnknownAdapterError,
    AdapterError,
)


def _error_body(status: int, kind: str, message: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


class OpenAIFrontEnd:
    """The routes, over the native service."""

    def __init__(
        self,
        service: TextGenerationService,
        engine: AsyncEngine,
        metrics: Metrics,
        auth_tokens: frozenset[str] | None,
        is_serving: Callable[[], bool],
    ) -> None:
        self.service, self.engine, self.metrics = service, engine, metrics
        self.auth_tokens, self.is_serving = auth_tokens, is_serving
        self.model_name = engine.description.model_name
        self.token_text = api.TokenText(engine.tokenizer)

    def app(self) -> FastAPI:
        app = FastAPI(title="genserve", docs_url=None, redoc_url=None, openapi_url=None)
        guarded = [Depends(self._authorize)]
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=guarded)
        app.add_api_route("/v1/completions", self.completions, methods=["POST"], dependencies=guarded)
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], dependencies=guarded)
        app.add_api_route("/tokenize", self.tokenize, methods=["POST"], dependencies=guarded)
        app.add_api_route("/detokenize", self.detokenize, methods=["POST"], dependencies=guarded)
        # vLLM's run-time LoRA routes (--allow-runtime-lora), answered as vLLM answers them: plain text.
        app.add_api_route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"], dependencies=guarded)
        app.add_api_route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"], dependencies=guarded)
        app.add_exception_handler(RequestValidationError, self._invalid_body)
        app.add_exception_handler(StarletteHTTPException, self._http_exception)
        for known in (_HttpError, *_KNOWN_ERRORS):
            app.add_exception_handler(known, self._engine_error)
        return app

    # Errors.
    def _map(self, error: Exception) -> _HttpError:
        if isinstance(error, _HttpError):
            return error
        if isinstance(error, ValidationError):
            return _HttpError(400, "invalid_request_error", str(error), error.field)
        if isinstance(error, QueueFullError):
            return _HttpError(429, "rate_limit_error", str(error))
        if isinstance(error, DrainingError | EngineDeadError):
            return _HttpError(503, "service_unavailable_error", str(error))
        if isinstance(error, DeadlineUnreachableError):
            return _HttpError(504, "timeout_error", str(error))
        if isinstance(error, ModelNotFoundError | UnknownAdapterError):
            return _HttpError(404, "not_found_error", str(error), "model")
        if isinstance(error, AdapterError):
            return _HttpError(400, "invalid_request_error", str(error), "model")
        if isinstance(error, RequestFailedError):
            return _HttpError(500, "internal_error", str(error))
        return _HttpError(500, "internal_error", f"internal error: {type(error).__name__}")

    def _respond(self, error: _HttpError) -> JSONResponse:
        headers = {}
        if error.status == 429:
            headers["Retry-After"] = str(max(1, round(self.engine.load_report().retry_delay_seconds)))
        if error.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body = _error_body(error.status, error.kind, str(error), error.param)
        return JSONResponse(body, status_code=error.status, headers=headers)

    async def _invalid_body(self, request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or "body"
        message = f"{param}: {first.get('msg', 'invalid')}"
        return self._respond(_HttpError(400, "invalid_request_error", message, param))

    async def _http_exception(self, request: Request, error: StarletteHTTPException) -> JSONResponse:
        return self._respond(_HttpError(error.status_code, "invalid_request_error", str(error.detail)))

    async def _engine_error(self, request: Request, error: Exception) -> JSONResponse:
        return self._respond(self._map(error))

    def _authorize(self, request: Request) -> None:
        if self.auth_tokens is not None and not bearer_token_accepted(
            request.headers.get("authorization", ""), self.auth_tokens
        ):
            raise _HttpError(401, "authentication_error", "a valid bearer token is required")

    def _check_model(self, model: str | None) -> str:
        """The LoRA adapter that `model` names, as vLLM selects them ("": the base model, or no name given)."""
        if not model or model == self.model_name:
            return ""
        try:
            self.engine.check_adapter(model)
        except UnknownAdapterError:
            served = ", ".join(repr(name) for name in (self.model_name, *self.engine.adapters()))
            raise ModelNotFoundError(f"model {model!r} is not served here; this server serves {served}") from None
        return model

    # Routes.
    async def health(self) -> Response:
        return Response(status_code=200 if self.is_serving() else 503)

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> dict:
        description = self.engine.description
        model = {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "genserve",
            "root": self.model_name,
            "parent": None,
            "max_model_len": description.config.max_context,
        }
        adapters = [model | {"id": name, "root": name, "parent": self.model_name} for name in self.engine.adapters()]
        return {"object": "list", "data": [model, *adapters]}

    async def tokenize(self, body: api.TokenizeRequest) -> dict:
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ValidationError("prompt", "set one of prompt or messages")
        if body.messages is not None:
            messages = [{"role": m.role, "content": api.message_text(m, i)} for i, m in enumerate(body.messages)]
            tokens = self.engine.encode_chat(messages)
        else:
            tokens = self.engine.encode_text(body.prompt, add_special_tokens=body.add_special_tokens)
        max_context = self.engine.description.config.max_context
        return {"count": len(tokens), "max_model_len": max_context, "tokens": tokens}

    async def detokenize(self, body: api.DetokenizeRequest) -> dict:
        self._check_model(body.model)
        if self.engine.tokenizer is None:
            raise ValidationError("tokens", "this model has no tokenizer")
        if any(not 0 <= token < self.engine.description.vocab_size for token in body.tokens):
            raise ValidationError("tokens", f"token ids must be in [0, {self.engine.description.vocab_size})")
        return {"prompt": self.engine.tokenizer.decode(body.tokens)}

    async def load_lora_adapter(self, body: api.LoadLoraAdapterRequest) -> Response:
        await self.engine.load_adapter(body.lora_name, body.lora_path)
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")

    async def unload_lora_adapter(self, body: api.UnloadLoraAdapterRequest) -> Response:
        self.engine.unload_adapter(body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")

    async def completions(self, body: api.CompletionRequest, request: Request) -> Response:
        adapter = self._check_model(body.model)
        natives = api.prompts(body, self._eos())
        for native in natives:
            native.adapter = adapter
        return await self._generate("Completions", body, natives, request, chat=False)

    async def chat_completions(self, body: api.ChatCompletionRequest, request: Request) -> Response:
        adapter = self._check_model(body.model)
        native = api.chat(body, self._eos())
        native.adapter = adapter
        if body.max_tokens is None and body.max_completion_tokens is None:
            native.parameters.max_new_tokens = self._room(native)  # as vLLM: up to the context's end
        return await self._generate("ChatCompletions", body, [native], request, chat=True)

    def _eos(self) -> tuple[int, ...]:
        return tuple(self.engine.make_parameters().eos_token_id)

    def _room(self, native: pb.GenerateRequest) -> int:
        prompt = self.engine.encode_chat([{"role": m.role, "content": m.content} for m in native.messages.messages])
        return max(1, self.engine.description.config.max_context - len(prompt))

    # Generation.
    async def _generate(
        self, method: str, body: api.SamplingRequest, natives: list[pb.GenerateRequest], request: Request, chat: bool
    ) -> Response:
        context = CallContext.of(request, body.user)
        samples, echoes, sample_natives = [], [], []
        for native in natives:
            prepared = self.service.prepare(native, context)
            for sample in self.service.samples(prepared, native):
                samples.append(sample)
                sample_natives.append(native)
                echoes.append(prepared.prompt_text)
        sources = [
            self.service.outputs(method, sample, native, context) for sample, native in zip(samples, sample_natives)
        ]
        stream = merged(sources)
        try:
            first = await anext(stream)  # admission errors become HTTP statuses, not a broken stream
        except BaseException:
            await stream.aclose()
            raise
        kind = "chat.completion" if chat else "text_completion"
        identifier = api.response_id("chatcmpl" if chat else "cmpl")
        prompt_tokens = sum(len(sample.prompt_ids) for sample in samples[:: body.n])
        if body.stream:
            model = natives[0].adapter or self.model_name
            events = self._events(stream, first, body, kind, identifier, model, echoes, prompt_tokens, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        outputs: list[list[GenerationOutput]] = [[] for _ in samples]
        outputs[first[0]].append(first[1])
        async for index, output in stream:
            outputs[index].append(output)
        choices = [self._choice(index, items, echoes[index], chat) for index, items in enumerate(outputs)]
        completion_tokens = sum(items[-1].num_generated_tokens for items in outputs)
        response = api.envelope(kind, identifier, natives[0].adapter or self.model_name, choices)
        response["usage"] = api.usage(prompt_tokens, completion_tokens)
        return JSONResponse(response)

    def _choice(self, index: int, outputs: list[GenerationOutput], echo: str, chat: bool) -> dict:
        text = echo + "".join(output.text for output in outputs)
        logprobs = tuple(item for output in outputs for item in output.logprobs)
        wanted = any(output.logprobs for output in outputs)
        finish = api.finish_reason(outputs[-1])
        if chat:
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": self.token_text.chat_logprobs(logprobs) if wanted else None,
                "finish_reason": finish,
            }
        return {
            "index": index,
            "text": text,
            "logprobs": self.token_text.completion_logprobs(logprobs, len(echo)) if wanted else None,
            "finish_reason": finish,
        }

    async def _events(
        self,
        stream: AsyncIterator[tuple[int, GenerationOutput]],
        first: tuple[int, GenerationOutput],
        body: api.SamplingRequest,
        kind: str,
        identifier: str,
        model: str,
        echoes: list[str],
        prompt_tokens: int,
        chat: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta (chat: the role first), the finish reason in each choice's
        last chunk, the usage chunk when asked, then [DONE]. An error after the first token ends the stream with an
        error event."""
        chunk_kind = "chat.completion.chunk" if chat else kind
        created = int(time.time())
        options = body.stream_options or api.StreamOptions()
        generated = [0] * len(echoes)
        text_offsets = [len(echo) for echo in echoes]

        def event(choices: list[dict], with_usage: bool = False) -> str:
            chunk = api.envelope(chunk_kind, identifier, model, choices, created)
            if with_usage or options.continuous_usage_stats:
                chunk["usage"] = api.usage(prompt_tokens, sum(generated))
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            if chat:
                for index in range(len(echoes)):
                    delta = {"role": "assistant", "content": ""}
                    yield event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
            else:
                for index, echo in enumerate(echoes):
                    if echo:
                        yield event([{"index": index, "text": echo, "logprobs": None, "finish_reason": None}])
            pending: list[tuple[int, GenerationOutput]] = [first]
            while pending:
                index, output = pending.pop()
                generated[index] = output.num_generated_tokens
                choice: dict = {"index": index, "logprobs": None, "finish_reason": api.finish_reason(output)}
                if chat:
                    choice["delta"] = {"content": output.text} if output.text or not choice["finish_reason"] else {}
                    if output.logprobs:
                        choice["logprobs"] = self.token_text.chat_logprobs(output.logprobs)
                else:
                    choice["text"] = output.text
                    if output.logprobs:
                        choice["logprobs"] = self.token_text.completion_logprobs(output.logprobs, text_offsets[index])
                    text_offsets[index] += len(output.text)
                if output.text or output.finish_reason is not None or output.logprobs:
                    yield event([choice])
                following = await anext(stream, None)
                if following is not None:
                    pending.append(following)
            if options.include_usage:
                yield event([], with_usage=True)
        except Exception as error:  # noqa: BLE001 - the status is sent: the error travels as an event
            mapped = self._map(error)
            yield f"data: {json.dumps(_error_body(mapped.status, mapped.kind, str(mapped), mapped.param))}\n\n"
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"
