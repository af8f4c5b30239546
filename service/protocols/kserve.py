"""KServe's Open Inference Protocol v2, in Triton's generate flavour (`inference.GRPCInferenceService`), over the
same engine as genserve.v1: each inference request becomes a native GenerateRequest; nothing here decides
anything the native API does not.

Tensors follow Triton's vLLM backend: `text_input` (BYTES [1], raw text, no chat template), optional `stream`,
`sampling_parameters` (a JSON object of vLLM SamplingParams names, or genserve's own parameter names),
`exclude_input_in_output` (false by default, so the text starts with the prompt) and the `return_*` switches of
the extra outputs (`finish_reason`, `num_input_tokens`, `num_output_tokens`, `cumulative_logprob`).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor

from genserve.scheduler import FinishReason, GenerationOutput, ValidationError
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.inference import grpc_service_pb2 as kpb
from genserve.service.proto_gen.inference import grpc_service_pb2_grpc
from genserve.service.protocols.errors import ModelNotFoundError
from genserve.service.protocols.native import TextGenerationService

SERVICE_NAME = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_VERSION = "1"
INPUTS = [
    ("text_input", "BYTES", [1]),
    ("stream", "BOOL", [1]),
    ("sampling_parameters", "BYTES", [1]),
    ("exclude_input_in_output", "BOOL", [1]),
    ("return_finish_reason", "BOOL", [1]),
    ("return_cumulative_logprob", "BOOL", [1]),
    ("return_num_input_tokens", "BOOL", [1]),
    ("return_num_output_tokens", "BOOL", [1]),
]
OUTPUTS = [
    ("text_output", "BYTES", [-1]),
    ("finish_reason", "BYTES", [-1]),
    ("cumulative_logprob", "FP32", [-1]),
    ("num_input_tokens", "UINT32", [1]),
    ("num_output_tokens", "UINT32", [-1]),
]
# vLLM SamplingParams names -> genserve.v1 GenerationParameters names.
VLLM_NAMES = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens", "stop": "stop_strings"}
# vLLM's finish reasons where it has one; genserve's own name otherwise.
VLLM_FINISH = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_STRING: "stop",
    FinishReason.CONSTRAINT_COMPLETE: "stop",
    FinishReason.STOPPING_CRITERIA: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "abort",
}
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
CACHE_SALT = "cache_salt"  # a request parameter (string): prefix caching shares blocks only between equal salts
LORA_NAME = "lora_name"  # in sampling_parameters: the LoRA adapter, as Triton's vLLM backend names it


def decode_tensor(tensor: kpb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[object]:
    """A BYTES or BOOL input's elements, from the raw contents (what tritonclient sends) or typed contents."""
    if tensor.datatype == "BYTES":
        if raw is None:
            return list(tensor.contents.bytes_contents)
        values, offset = [], 0
        while offset < len(raw):  # each element: a 4-byte little-endian length, then that many bytes
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return values
    if tensor.datatype == "BOOL":
        return [bool(b) for b in raw] if raw is not None else list(tensor.contents.bool_contents)
    raise ValidationError(tensor.name, f"datatype {tensor.datatype} is not accepted (BYTES or BOOL)")


def _bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


@dataclass(frozen=True)
class InferRequest:
    """One inference request, read: the native request it becomes, and what the response should carry."""

    id: str
    native: pb.GenerateRequest
    stream: bool
    include_input: bool
    wanted: frozenset[str]  # extra outputs asked for
    empty_final: bool


def parameters_from_json(text: bytes | str) -> tuple[pb.GenerationParameters, str]:
    """`sampling_parameters`: vLLM names or genserve's; values may be strings, as Triton's examples send them.
    Returns the parameters and the LoRA adapter that `lora_name` selects, as in Triton's vLLM backend ("": none)."""
    try:
        values = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise ValidationError("sampling_parameters", f"not JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValidationError("sampling_parameters", "must be a JSON object")
    adapter = values.pop(LORA_NAME, "")
    if not isinstance(adapter, str):
        raise ValidationError(f"sampling_parameters.{LORA_NAME}", f"must be a string, got {adapter!r}")
    message = pb.GenerationParameters()
    fields = pb.GenerationParameters.DESCRIPTOR.fields_by_name
    for key, value in values.items():
        name = VLLM_NAMES.get(key, key)
        field = fields.get(name)
        if name == "top_k" and str(value) == "-1":  # vLLM's "off"
            value = 0
        if field is None or (field.message_type is not None and name != "logit_bias"):
            raise ValidationError(f"sampling_parameters.{key}", "unknown or unsupported parameter")
        try:
            _set(message, field, value)
        except (TypeError, ValueError) as error:
            raise ValidationError(f"sampling_parameters.{key}", f"bad value {value!r}: {error}") from None
    if "temperature" in values and "do_sample" not in values:  # vLLM samples whenever temperature > 0
        message.do_sample = message.temperature > 0
    return message, adapter


def _set(message: pb.GenerationParameters, field: FieldDescriptor, value: object) -> None:
    if field.name == "logit_bias":
        message.logit_bias.update({int(token): float(bias) for token, bias in dict(value).items()})
        return
    if field.is_repeated:
        items = [value] if isinstance(value, str | int) else list(value)
        getattr(message, field.name).extend(_scalar(field, item) for item in items)
        return
    setattr(message, field.name, _scalar(field, value))


def _scalar(field: FieldDescriptor, value: object) -> object:
    if field.type == FieldDescriptor.TYPE_BOOL:
        return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1")
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return float(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        return str(value)
    return int(value)


class KServeService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, native: TextGenerationService, model_name: str, version: str) -> None:
        self.native = native
        self.model_name = model_name
        self.version = version

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.model_name or version not in ("", MODEL_VERSION):
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not served; this server serves "
                f"{self.model_name!r} version {MODEL_VERSION}"
            )

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> object:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> object:
        return kpb.ServerReadyResponse(ready=not self.native.draining)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> object:
        self._check_model(request.name, request.version)
        return kpb.ModelReadyResponse(ready=not self.native.draining)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> object:
        return kpb.ServerMetadataResponse(name="genserve", version=self.version, extensions=["parameters"])

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> object:
        self._check_model(request.name, request.version)
        metadata = kpb.ModelMetadataResponse.TensorMetadata
        return kpb.ModelMetadataResponse(
            name=self.model_name,
            versions=[MODEL_VERSION],
            platform="genserve",
            inputs=[metadata(name=n, datatype=t, shape=s) for n, t, s in INPUTS],
            outputs=[metadata(name=n, datatype=t, shape=s) for n, t, s in OUTPUTS],
        )

    def _read(self, request: kpb.ModelInferRequest) -> InferRequest:
        self._check_model(request.model_name, request.model_version)
        known = {name for name, _, _ in INPUTS}
        values: dict[str, object] = {}
        raw = list(request.raw_input_contents)
        for index, tensor in enumerate(request.inputs):
            if tensor.name not in known:
                raise ValidationError(tensor.name, f"unknown input; this model takes {', '.join(sorted(known))}")
            elements = decode_tensor(tensor, raw[index] if index < len(raw) else None)
            if len(elements) != 1:
                raise ValidationError(tensor.name, f"expected one element, got {len(elements)}")
            values[tensor.name] = elements[0]
        if "text_input" not in values:
            raise ValidationError("text_input", "the prompt is required")
        try:
            text = values["text_input"].decode()
        except UnicodeDecodeError:
            raise ValidationError("text_input", "is not UTF-8") from None
        parameters, adapter = parameters_from_json(values.get("sampling_parameters", b"{}"))
        wanted = frozenset(name[len("return_") :] for name in values if name.startswith("return_") and values[name])
        native = pb.GenerateRequest(
            text=text,
            parameters=parameters,
            request_id=request.id,
            return_token_ids=True,
            return_logprobs="cumulative_logprob" in wanted,
            cache_salt=request.parameters[CACHE_SALT].string_param if CACHE_SALT in request.parameters else "",
            adapter=adapter,
        )
        empty_final = request.parameters[EMPTY_FINAL].bool_param if EMPTY_FINAL in request.parameters else False
        return InferRequest(
            id=request.id,
            native=native,
            stream=bool(values.get("stream", False)),
            include_input=not values.get("exclude_input_in_output", False),
            wanted=wanted,
            empty_final=empty_final,
        )

    def _empty_response(self, read: InferRequest, final: bool) -> kpb.ModelInferResponse:
        response = kpb.ModelInferResponse(model_name=self.model_name, model_version=MODEL_VERSION, id=read.id)
        response.parameters[FINAL].bool_param = final
        return response

    def _response(self, read: InferRequest, text: str, outputs: list[GenerationOutput], final: bool) -> object:
        """A response carrying `text` and the extra outputs asked for, over the tokens of `outputs` (never empty:
        the engine's last output carries the finish)."""
        response = self._empty_response(read, final)
        columns = [("text_output", "BYTES", _bytes_tensor(text.encode()))]
        last = outputs[-1]
        if "finish_reason" in read.wanted and last.finish_reason is not None:
            reason = VLLM_FINISH.get(last.finish_reason, last.finish_reason.value)
            columns.append(("finish_reason", "BYTES", _bytes_tensor(reason.encode())))
        if "num_input_tokens" in read.wanted:
            columns.append(("num_input_tokens", "UINT32", struct.pack("<I", last.num_prompt_tokens)))
        if "num_output_tokens" in read.wanted:
            count = sum(len(output.token_ids) for output in outputs)
            columns.append(("num_output_tokens", "UINT32", struct.pack("<I", count)))
        if "cumulative_logprob" in read.wanted:
            total = sum(item.logprob for output in outputs for item in output.logprobs)
            columns.append(("cumulative_logprob", "FP32", struct.pack("<f", total)))
        for name, datatype, data in columns:
            response.outputs.add(name=name, datatype=datatype, shape=[1])
            response.raw_output_contents.append(data)
        return response

    async def _generate(
        self, read: InferRequest, method: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kpb.ModelInferResponse]:
        """The responses to one request: one with the whole text, or, streaming, one per text delta."""
        prepared = self.native.prepare(read.native, context)
        prefix = read.native.text if read.include_input else ""
        outputs: list[GenerationOutput] = []
        async for output in self.native.outputs(method, prepared, read.native, context):
            outputs.append(output)
            if read.stream and (output.text or output.finish_reason is not None):
                final = output.finish_reason is not None and not read.empty_final
                yield self._response(read, prefix + output.text, [output], final)
                prefix = ""
        if not read.stream:
            yield self._response(read, prefix + "".join(o.text for o in outputs), outputs, True)
        elif read.empty_final:
            yield self._empty_response(read, final=True)

    async def ModelInfer(self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext) -> object:
        read = self._read(request)
        if read.stream:
            raise ValidationError("stream", "ModelInfer answers once; stream with ModelStreamInfer")
        return [response async for response in self._generate(read, "ModelInfer", context)][-1]

    async def ModelStreamInfer(
        self, requests: AsyncIterator[kpb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Requests run concurrently as they arrive; their responses interleave. A request's failure is its own
        error_message; cancelling the call cancels every request on it."""
        queue: asyncio.Queue[kpb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def run(request: kpb.ModelInferRequest) -> None:
            try:
                read = self._read(request)
                async for response in self._generate(read, "ModelStreamInfer", context):
                    await queue.put(kpb.ModelStreamInferResponse(infer_response=response))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - this request's failure, told on the stream
                failed = kpb.ModelInferResponse(model_name=request.model_name, id=request.id)
                await queue.put(kpb.ModelStreamInferResponse(error_message=str(error), infer_response=failed))

        async def read_requests() -> None:
            try:
                async for request in requests:
                    tasks.add(asyncio.ensure_future(run(request)))
                await asyncio.gather(*tasks)
            finally:
                await queue.put(None)

        reader = asyncio.ensure_future(read_requests())
        try:
            while (response := await queue.get()) is not None:
                yield response
            await reader  # surfaces a failure of the client stream itself
        finally:
            for task in (reader, *tasks):
                task.cancel()
