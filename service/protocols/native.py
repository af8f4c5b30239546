"""genserve.v1's TextGeneration service: each call is validated, submitted to the engine through `AsyncEngine`, and
answered from that request's stream (n samples merged, resumable streams kept). KServe and TGIS translate into it.

Handlers only validate, submit and await the engine's per-request stream; the model runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc

from genserve.scheduler import (
    AsyncEngine,
    DeadlineUnreachableError,
    EngineDeadError,
    FinishReason,
    GenerationOutput,
    GenerationParameters,
    Priority,
    QueueFullError,
    RequestFailedError,
    RequestOptions,
    ValidationError,
)
from genserve.service.ops.metrics import Metrics
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from genserve.service.protocols.convert import (
    FINISH_REASONS,
    chat_messages,
    constraint_from_proto,
    logprobs_to_proto,
    parameter_overrides,
    parameters_to_proto,
)
from genserve.service.protocols.errors import DrainingError
from genserve.service.protocols.merged_streams import merged
from genserve.service.protocols.stream_store import Chunk, StreamStore

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

MAX_RETURN_SEQUENCES = 16
T = TypeVar("T")

log = logging.getLogger(__name__)
request_log = logging.getLogger("genserve.requests")


def _choice(index: int, outputs: list[GenerationOutput], request: pb.GenerateRequest, prompt_text: str) -> pb.Choice:
    last = outputs[-1]
    return pb.Choice(
        index=index,
        text=prompt_text + "".join(output.text for output in outputs),
        token_ids=[t for output in outputs for t in output.token_ids] if request.return_token_ids else [],
        finish_reason=FINISH_REASONS[last.finish_reason],
        stop_string=last.stop_string or "",
        generated_tokens=last.num_generated_tokens,
        logprobs=logprobs_to_proto(tuple(lp for output in outputs for lp in output.logprobs)),
    )


async def _with_offsets(outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[Chunk]:
    previous = None
    async for output in outputs:
        previous = Chunk.after(previous, output)
        yield previous


def _stream_message(chunk: Chunk, request: pb.GenerateRequest, prompt_text: str) -> pb.GenerateStreamResponse:
    output, is_first = chunk.output, chunk.token_offset == 0 and chunk.text_offset == 0
    message = pb.GenerateStreamResponse(
        request_id=output.request_id,
        text=(prompt_text if is_first else "") + output.text,
        token_ids=list(output.token_ids) if request.return_token_ids else [],
        logprobs=logprobs_to_proto(output.logprobs),
        token_offset=chunk.token_offset,
        text_offset=chunk.text_offset,
    )
    if is_first:
        message.prompt_tokens = output.num_prompt_tokens
    if output.finish_reason is not None:
        message.finish_reason = FINISH_REASONS[output.finish_reason]
        message.stop_string = output.stop_string or ""
        message.usage.CopyFrom(
            pb.Usage(prompt_tokens=output.num_prompt_tokens, generated_tokens=output.num_generated_tokens)
        )
    return message


def _deadline_passed(output: GenerationOutput, options: RequestOptions, now: float) -> bool:
    """The engine dropped the request at its deadline; unless partial results were asked for, that is
    DEADLINE_EXCEEDED (the engine can notice a moment before gRPC does)."""
    return (
        output.finish_reason is FinishReason.TIME_LIMIT
        and options.deadline is not None
        and not options.partial_on_deadline
        and now >= options.deadline
    )


def _client_id(context: grpc.aio.ServicerContext) -> str:
    """The `x-client-id` metadata when the client names itself, else its address (without the port)."""
    named = dict(context.invocation_metadata() or ()).get("x-client-id")
    return named or context.peer().rsplit(":", 1)[0]


MAX_CACHE_SALT_LENGTH = 256


def _cache_salt(request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
    """The request's `cache_salt`, else the `x-cache-salt` metadata (how TGIS clients, whose messages have no such
    field, set it)."""
    salt = request.cache_salt or dict(context.invocation_metadata() or ()).get("x-cache-salt", "")
    if len(salt) > MAX_CACHE_SALT_LENGTH:
        raise ValidationError("cache_salt", f"at most {MAX_CACHE_SALT_LENGTH} characters, got {len(salt)}")
    return salt


@dataclass
class PreparedRequest:
    prompt_ids: list[int]
    params: GenerationParameters
    prompt_text: str
    options: RequestOptions


class TextGenerationService(generate_pb2_grpc.TextGenerationServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Metrics,
        max_requests_per_client: int | None = None,
        stream_retention_seconds: float = 60.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.streams = StreamStore(stream_retention_seconds)
        self.max_requests_per_client = max_requests_per_client
        self.in_flight: Counter[str] = Counter()
        self.draining = False

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.text:
                raise ValidationError("text", "the prompt text is empty")
            return self.engine.encode_text(request.text)
        if kind == "input_ids":
            return list(request.input_ids.ids)
        if kind == "messages":
            return self.engine.encode_chat(chat_messages(request.messages, CHAT_ROLES))
        raise ValidationError("input", "set one of text, input_ids or messages")

    def _negative_prompt_ids(self, request: pb.GenerateRequest) -> tuple[int, ...] | None:
        kind = request.WhichOneof("negative_prompt")
        if kind == "negative_text":
            return tuple(self.engine.encode_text(request.negative_text))
        if kind == "negative_input_ids":
            return tuple(request.negative_input_ids.ids)
        return None

    def prepare(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> PreparedRequest:
        if self.draining:
            raise DrainingError("the server is draining for shutdown; retry on another replica")
        prompt_ids = self._prompt_ids(request)
        if request.HasField("truncate_prompt_tokens"):
            keep = request.truncate_prompt_tokens
            if keep < 1:
                raise ValidationError("truncate_prompt_tokens", f"must be >= 1, got {keep}")
            prompt_ids = prompt_ids[-keep:]
        overrides = parameter_overrides(request.parameters)
        constraint = None
        if request.HasField("constraint"):
            constraint, allowed_token_ids = constraint_from_proto(request.constraint)
            if allowed_token_ids:
                overrides["allowed_token_ids"] = allowed_token_ids
        params = self.engine.make_parameters(prompt_length=len(prompt_ids), **overrides)
        prompt_text = ""
        if request.echo_prompt and self.engine.tokenizer is not None:
            prompt_text = self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        wants_logprobs = request.return_logprobs or request.top_logprobs > 0
        remaining = context.time_remaining()
        options = RequestOptions(
            request_id=request.request_id or None,
            client_id=_client_id(context),
            top_logprobs=request.top_logprobs if wants_logprobs else None,
            processed_logprobs=request.logprobs_mode == pb.PROCESSED_LOGPROBS,
            # The client's gRPC deadline drives scheduling: refused early if unreachable, dropped if it expires queued.
            deadline=time.monotonic() + remaining if remaining is not None and not request.resumable else None,
            partial_on_deadline=request.partial_on_deadline,
            priority=Priority.BATCH if request.priority == pb.BATCH else Priority.INTERACTIVE,
            logits_processors=tuple((c.name, c.json_args) for c in request.logits_processors),
            stopping_criteria=tuple((c.name, c.json_args) for c in request.stopping_criteria),
            constraint=constraint,
            negative_prompt_ids=self._negative_prompt_ids(request),
            cache_salt=_cache_salt(request, context),
            adapter=request.adapter,
        )
        return PreparedRequest(prompt_ids, params, prompt_text, options)

    async def outputs(
        self, method: str, prepared: PreparedRequest, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerationOutput]:
        """The engine's outputs for this request, timed into the metrics on the way through."""
        client = prepared.options.client_id
        limit = self.max_requests_per_client
        if limit is not None and self.in_flight[client] >= limit:
            raise QueueFullError(f"client {client!r} already has {limit} requests in flight")
        self.in_flight[client] += 1
        started = previous = time.monotonic()
        first_token_at: float | None = None
        last: GenerationOutput | None = None
        code = "OK"
        try:
            async for output in self.engine.generate(prepared.prompt_ids, prepared.params, prepared.options):
                now = time.monotonic()
                if _deadline_passed(output, prepared.options, now):
                    raise DeadlineUnreachableError("the deadline passed while the request waited for a row")
                if output.token_ids:
                    if first_token_at is None:
                        first_token_at = now
                        priority = prepared.options.priority.name.lower()
                        self.metrics.time_to_first_token.labels(priority=priority).observe(now - started)
                    else:
                        self.metrics.inter_token_latency.observe(now - previous)
                    previous = now
                last = output
                yield output
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        except RequestFailedError:
            code = "INTERNAL"
            raise
        except EngineDeadError:
            code = "UNAVAILABLE"
            raise
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]
            finish = last.finish_reason.value if last is not None and last.finish_reason is not None else ""
            generated = last.num_generated_tokens if last is not None else 0
            duration = time.monotonic() - started
            self.metrics.record_request(
                method, code, finish, duration, len(prepared.prompt_ids), generated, prepared.options.adapter
            )
            # Never the prompt or the output text: logs are not a place for user data.
            request_log.info(
                "request finished",
                extra={
                    "request_id": last.request_id if last is not None else request.request_id,
                    "method": method,
                    "code": code,
                    "finish_reason": finish,
                    "prompt_tokens": len(prepared.prompt_ids),
                    "generated_tokens": generated,
                    "duration_s": round(duration, 4),
                    "ttft_s": round(first_token_at - started, 4) if first_token_at is not None else None,
                },
            )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        samples = self.samples(self.prepare(request, context), request)
        outputs: list[list[GenerationOutput]] = [[] for _ in samples]
        sources = [self.outputs("Generate", sample, request, context) for sample in samples]
        async for index, output in merged(sources):
            outputs[index].append(output)
        choices = [_choice(index, items, request, samples[0].prompt_text) for index, items in enumerate(outputs)]
        first, last = choices[0], outputs[0][-1]
        return pb.GenerateResponse(
            # With n samples, each sample's id is "<id>/<i>": the response names the request itself.
            request_id=last.request_id if len(samples) == 1 else last.request_id.rsplit("/", 1)[0],
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            stop_string=first.stop_string,
            usage=pb.Usage(
                prompt_tokens=last.num_prompt_tokens, generated_tokens=sum(c.generated_tokens for c in choices)
            ),
            logprobs=first.logprobs,
            choices=choices,
        )

    def samples(self, prepared: PreparedRequest, request: pb.GenerateRequest) -> list[PreparedRequest]:
        """One prepared request per sample: ids `<id>/<i>`, seeds `seed + i` (the engine prefills them once)."""
        count = request.num_return_sequences or 1
        if not 1 <= count <= MAX_RETURN_SEQUENCES:
            raise ValidationError("num_return_sequences", f"must be in [1, {MAX_RETURN_SEQUENCES}], got {count}")
        if count == 1:
            return [prepared]
        if request.resumable:
            raise ValidationError("num_return_sequences", "resumable streams carry one sequence")
        base_id = prepared.options.request_id or uuid.uuid4().hex
        samples = []
        for index in range(count):
            params = prepared.params
            if params.seed is not None:
                params = replace(params, seed=(params.seed + index) % 2**63)
            options = replace(prepared.options, request_id=f"{base_id}/{index}")
            samples.append(replace(prepared, params=params, options=options))
        return samples

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        if request.HasField("resume_from_token"):
            stream = self.streams.get(request.request_id)
            async for chunk in self.streams.follow(stream, request.resume_from_token):
                yield _stream_message(chunk, request, prompt_text="")
            return
        prepared = self.prepare(request, context)
        samples = self.samples(prepared, request)
        if request.resumable:
            if not request.request_id:
                raise ValidationError("request_id", "a resumable stream needs a request_id to be resumed by")
            if self.streams.is_retained(request.request_id):
                raise ValidationError("request_id", f"a resumable stream {request.request_id!r} already exists")
            # The generation outlives this call: it runs in the store's task, this call only reads.
            outputs = self.outputs("GenerateStream", prepared, request, context)
            chunks = self.streams.follow(self.streams.start(request.request_id, outputs))
            async for chunk in chunks:
                yield _stream_message(chunk, request, prepared.prompt_text)
            return
        sources = [_with_offsets(self.outputs("GenerateStream", sample, request, context)) for sample in samples]
        async for index, chunk in merged(sources):
            message = _stream_message(chunk, request, prepared.prompt_text)
            message.index = index
            yield message

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        kind = request.WhichOneof("input")
        if kind == "messages":
            return pb.TokenizeResponse(token_ids=self.engine.encode_chat(chat_messages(request.messages, CHAT_ROLES)))
        if kind != "text":
            raise ValidationError("input", "set one of text or messages")
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValidationError("text", "this model has no tokenizer")
        encoding = tokenizer(request.text, return_offsets_mapping=request.return_offsets)
        response = pb.TokenizeResponse(token_ids=encoding["input_ids"])
        if request.return_offsets:
            response.offsets.extend(pb.TokenOffset(start=s, end=e) for s, e in encoding["offset_mapping"])
        return response

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterList:
        if not request.name:
            raise ValidationError("name", "name the adapter")
        if not request.path:
            raise ValidationError("path", "give the adapter's folder")
        await self.engine.load_adapter(request.name, request.path)
        return pb.AdapterList(adapters=self.engine.adapters())

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterList:
        self.engine.unload_adapter(request.name)
        return pb.AdapterList(adapters=self.engine.adapters())

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        model, defaults = self.engine.description, self.engine.make_parameters()
        return pb.ModelInfoResponse(
            model_name=model.model_name,
            vocab_size=model.vocab_size,
            max_context=model.config.max_context,
            eos_token_ids=list(defaults.eos_token_id),
            default_parameters=parameters_to_proto(defaults),
            limits=pb.Limits(
                max_batch_size=model.config.max_running,
                max_queue=model.config.max_queue,
                max_context=model.config.max_context,
                max_num_batched_tokens=model.config.max_num_batched_tokens,
                kv_cache_tokens=model.kv_cache_tokens,
                kv_block_size=model.kv_block_size,
            ),
            has_chat_template=bool(self.engine.tokenizer is not None and self.engine.tokenizer.chat_template),
            prefix_caching=model.config.prefix_caching,
            assistant_model=model.assistant_model,
            architecture=model.architecture,
            attn_implementation=model.attn_implementation,
            tensor_parallel_size=model.config.tensor_parallel_size,
            adapters=self.engine.adapters(),
        )
