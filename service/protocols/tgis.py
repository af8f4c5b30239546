"""IBM TGIS's `fmaas.GenerationService` over the same engine as genserve.v1: each TGIS request becomes a native
GenerateRequest, each native output a TGIS response. What genserve cannot honour is INVALID_ARGUMENT naming the
field, never dropped.

TGIS semantics kept: `max_new_tokens` 0 means 20; zero sampling fields mean "off"; `include_stop_sequence` is
true when unset, so the stop sequence ends the returned text; a sampling request without a seed gets one, and
every response reports the seed used.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc

from genserve.scheduler import FinishReason, GenerationOutput, ValidationError
from genserve.service.proto_gen.fmaas import generation_pb2 as tpb
from genserve.service.proto_gen.fmaas import generation_pb2_grpc
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.protocols.native import TextGenerationService

SERVICE_NAME = tpb.DESCRIPTOR.services_by_name["GenerationService"].full_name
DEFAULT_MAX_NEW_TOKENS = 20
MAX_TOP_N_TOKENS = 5
STOP_REASONS = {
    FinishReason.LENGTH: tpb.MAX_TOKENS,
    FinishReason.EOS_TOKEN: tpb.EOS_TOKEN,
    FinishReason.CONSTRAINT_COMPLETE: tpb.EOS_TOKEN,
    FinishReason.STOP_STRING: tpb.STOP_SEQUENCE,
    FinishReason.STOPPING_CRITERIA: tpb.STOP_SEQUENCE,
    FinishReason.TIME_LIMIT: tpb.TIME_LIMIT,
    FinishReason.CANCELLED: tpb.CANCELLED,
}


def native_request(text: str, params: tpb.Parameters) -> pb.GenerateRequest:
    """The genserve.v1 request for one TGIS request (with a fresh seed for an unseeded sampling request)."""
    native = pb.GenerateRequest(text=text, return_token_ids=True)
    parameters = native.parameters
    sampling = params.sampling
    if params.method == tpb.SAMPLE:
        parameters.do_sample = True
        if sampling.temperature:
            parameters.temperature = sampling.temperature
        parameters.top_k = sampling.top_k  # 0: off, in both
        parameters.top_p = sampling.top_p or 1.0
        parameters.typical_p = sampling.typical_p or 1.0
        parameters.seed = sampling.seed if sampling.HasField("seed") else random.getrandbits(63)
    else:
        parameters.do_sample = False
        for name in ("temperature", "top_k", "top_p", "typical_p"):
            if getattr(sampling, name):
                raise ValidationError(f"params.sampling.{name}", "applies to method SAMPLE, not GREEDY")
    stopping = params.stopping
    parameters.max_new_tokens = stopping.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if stopping.min_new_tokens:
        parameters.min_new_tokens = stopping.min_new_tokens
    if stopping.time_limit_millis:
        parameters.max_time = stopping.time_limit_millis / 1000
    parameters.stop_strings.extend(stopping.stop_sequences)
    decoding = params.decoding
    if decoding.repetition_penalty:
        parameters.repetition_penalty = decoding.repetition_penalty
    if decoding.HasField("length_penalty"):
        raise ValidationError("params.decoding.length_penalty", "exponential length penalty is not supported")
    guided = decoding.WhichOneof("guided")
    if guided == "format" and decoding.format == tpb.DecodingParameters.JSON:
        native.constraint.json_schema = "{}"  # any JSON value
    elif guided == "choice":
        native.constraint.choice.choices.extend(decoding.choice.choices)
    elif guided in ("json_schema", "regex", "grammar"):
        setattr(native.constraint, guided, getattr(decoding, guided))
    if params.truncate_input_tokens:
        native.truncate_prompt_tokens = params.truncate_input_tokens
    response = params.response
    if response.top_n_tokens > MAX_TOP_N_TOKENS:
        raise ValidationError("params.response.top_n_tokens", f"at most {MAX_TOP_N_TOKENS}")
    if response.input_tokens and (response.token_logprobs or response.token_ranks or response.top_n_tokens):
        raise ValidationError("params.response.input_tokens", "logprobs and ranks of prompt tokens are not computed")
    if response.generated_tokens and (response.token_logprobs or response.token_ranks or response.top_n_tokens):
        native.return_logprobs = True
        native.top_logprobs = response.top_n_tokens
    return native


class TGISService(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, native: TextGenerationService) -> None:
        self.native = native

    def _adapter(self, request: tpb.BatchedGenerationRequest | tpb.SingleGenerationRequest) -> str:
        """The LoRA adapter the request names: `adapter_id`, or the deprecated `prefix_id` ("": the base model).
        One the server has not loaded is NOT_FOUND."""
        adapter = request.adapter_id or request.prefix_id
        if adapter:
            self.native.engine.check_adapter(adapter)
        return adapter

    def _token_infos(self, token_ids: list[int], logprobs: tuple, options: tpb.ResponseOptions) -> list:
        tokens = self.native.engine.tokenizer.convert_ids_to_tokens(token_ids)
        infos = []
        for index, text in enumerate(tokens):
            info = tpb.TokenInfo(text=text)
            if index < len(logprobs):
                item = logprobs[index]
                if options.token_logprobs:
                    info.logprob = item.logprob
                if options.token_ranks:
                    info.rank = item.rank
                top_texts = self.native.engine.tokenizer.convert_ids_to_tokens([token for token, _ in item.top])
                info.top_tokens.extend(
                    tpb.TokenInfo.TopToken(text=top, logprob=logprob) for top, (_, logprob) in zip(top_texts, item.top)
                )
            infos.append(info)
        return infos

    def _message(self, outputs: list[GenerationOutput], params: tpb.Parameters, seed: int) -> tpb.GenerationResponse:
        """A response over these outputs (the whole generation, or one streamed delta)."""
        last = outputs[-1]
        text = "".join(output.text for output in outputs)
        message = tpb.GenerationResponse(
            input_token_count=last.num_prompt_tokens, generated_token_count=last.num_generated_tokens, seed=seed
        )
        if last.finish_reason is not None:
            message.stop_reason = STOP_REASONS.get(last.finish_reason, tpb.ERROR)
            if last.finish_reason is FinishReason.STOP_STRING:
                message.stop_sequence = last.stop_string or ""
                include = (
                    params.stopping.include_stop_sequence if params.stopping.HasField("include_stop_sequence") else True
                )
                text += message.stop_sequence if include else ""
        message.text = text
        if params.response.generated_tokens:
            token_ids = [token for output in outputs for token in output.token_ids]
            logprobs = tuple(item for output in outputs for item in output.logprobs)
            message.tokens.extend(self._token_infos(token_ids, logprobs, params.response))
        return message

    async def _run(
        self,
        method: str,
        text: str,
        request: tpb.BatchedGenerationRequest | tpb.SingleGenerationRequest,
        context: grpc.aio.ServicerContext,
        stream: bool,
    ) -> AsyncIterator[tpb.GenerationResponse]:
        params = request.params
        native = native_request(text, params)
        native.adapter = self._adapter(request)
        prepared = self.native.prepare(native, context)
        seed = prepared.params.seed if prepared.params.is_sampling and prepared.params.seed is not None else 0
        options = params.response
        echoed = text if options.input_text else ""
        input_tokens = self._token_infos(prepared.prompt_ids, (), options) if options.input_tokens else []
        if stream:  # TGIS streams the prompt's count (and, when asked, its text and tokens) first
            yield tpb.GenerationResponse(
                input_token_count=len(prepared.prompt_ids), seed=seed, text=echoed, input_tokens=input_tokens
            )
        outputs: list[GenerationOutput] = []
        async for output in self.native.outputs(method, prepared, native, context):
            outputs.append(output)
            if stream and (output.token_ids or output.finish_reason is not None):
                yield self._message([output], params, seed)
        if not stream:
            message = self._message(outputs, params, seed)
            message.text = echoed + message.text
            message.input_tokens.extend(input_tokens)
            yield message

    async def Generate(
        self, request: tpb.BatchedGenerationRequest, context: grpc.aio.ServicerContext
    ) -> tpb.BatchedGenerationResponse:
        """The batch's requests run concurrently in the continuous batch; responses keep their order."""
        if not request.requests:
            raise ValidationError("requests", "give at least one request")

        async def one(item: tpb.GenerationRequest) -> tpb.GenerationResponse:
            messages = self._run("TGIS/Generate", item.text, request, context, stream=False)
            return [message async for message in messages][0]

        return tpb.BatchedGenerationResponse(responses=await asyncio.gather(*(one(r) for r in request.requests)))

    async def GenerateStream(
        self, request: tpb.SingleGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tpb.GenerationResponse]:
        async for message in self._run("TGIS/GenerateStream", request.request.text, request, context, True):
            yield message

    async def Tokenize(
        self, request: tpb.BatchedTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> tpb.BatchedTokenizeResponse:
        tokenizer = self.native.engine.tokenizer
        if tokenizer is None:
            raise ValidationError("requests", "this model has no tokenizer")
        self._adapter(request)  # adapters share the base model's tokenizer; an unknown one is still NOT_FOUND
        responses = []
        for item in request.requests:
            encoding = tokenizer(item.text, return_offsets_mapping=request.return_offsets)
            ids, offsets = encoding["input_ids"], encoding.get("offset_mapping", [])
            if request.truncate_input_tokens:
                ids, offsets = ids[-request.truncate_input_tokens :], offsets[-request.truncate_input_tokens :]
            response = tpb.TokenizeResponse(token_count=len(ids))
            if request.return_tokens:
                response.tokens.extend(tokenizer.convert_ids_to_tokens(ids))
            if request.return_offsets:
                response.offsets.extend(tpb.TokenizeResponse.Offset(start=s, end=e) for s, e in offsets)
            responses.append(response)
        return tpb.BatchedTokenizeResponse(responses=responses)

    async def ModelInfo(self, request: tpb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> object:
        max_context = self.native.engine.description.config.max_context
        return tpb.ModelInfoResponse(
            model_kind=tpb.ModelInfoResponse.DECODER_ONLY,
            max_sequence_length=max_context,
            max_new_tokens=max_context,
        )
