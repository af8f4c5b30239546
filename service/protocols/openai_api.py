"""The OpenAI Completions and Chat Completions API, translated into genserve.v1: request bodies (pydantic models,
field for field as OpenAI and vLLM name them) become `GenerateRequest`s, and the engine's outputs become OpenAI's
response, chunk and error shapes. Mapping only: admission, limits, deadlines and metrics are the native service's.
The HTTP transport is http_app.py.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from genserve.scheduler import FinishReason, GenerationOutput, TokenLogprob, ValidationError
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

# genserve's own GenerationConfig names, accepted in the body beside OpenAI's and vLLM's (as vLLM accepts extras).
NATIVE_PARAMETERS = frozenset(pb.GenerationParameters.DESCRIPTOR.fields_by_name) - {"logit_bias", "bad_words_ids"}
REFUSED = {  # what genserve cannot honour is refused by name, never ignored
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "suffix": "suffix (insertion) is not supported",
}
MAX_COMPLETION_LOGPROBS = 20
FINISH_REASONS = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_STRING: "stop",
    FinishReason.STOPPING_CRITERIA: "stop",
    FinishReason.CONSTRAINT_COMPLETE: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.TIME_LIMIT: "length",
    FinishReason.CANCELLED: "abort",
}

Number = StrictInt | StrictFloat
TokenIdList = list[StrictInt]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StructuredOutputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None


class SamplingRequest(BaseModel):
    """What Completions and Chat Completions share: OpenAI's parameters, then vLLM's extra ones."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=16)] = 1
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt, Field(ge=0, lt=2**63)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling parameters.
    top_k: StrictInt | None = None  # -1 or 0 disables
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: TokenIdList | None = None
    priority: StrictInt = 0  # as vLLM: lower is served first; > 0 is genserve's BATCH priority
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    cache_salt: StrictStr | None = None
    best_of: StrictInt | None = None
    tool_choice: Any = None


class CompletionRequest(SamplingRequest):
    prompt: StrictStr | list[StrictStr] | TokenIdList | list[TokenIdList]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = 16  # OpenAI's and vLLM's default for completions
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: TokenIdList


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoraAdapterRequest(BaseModel):
    """vLLM's /v1/unload_lora_adapter body."""

    lora_name: StrictStr


# Requests: OpenAI body -> genserve.v1.
def prompts(request: CompletionRequest, eos_token_ids: tuple[int, ...]) -> list[pb.GenerateRequest]:
    """One native request per prompt of a Completions body (a list of prompts gives choices prompt by prompt);
    `eos_token_ids`: the model's, which `stop_token_ids` add to."""
    items = request.prompt
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        items = [items]
    if not items:
        raise ValidationError("prompt", "at least one prompt is required")
    natives = []
    for item in items:
        native = _native(request, eos_token_ids)
        if isinstance(item, str):
            native.text = item
        else:
            if not item:
                raise ValidationError("prompt", "a prompt of token ids is empty")
            native.input_ids.ids.extend(item)
        native.echo_prompt = request.echo
        if request.logprobs is not None:
            native.return_logprobs = True
            native.top_logprobs = request.logprobs
        natives.append(native)
    return natives


def chat(request: ChatCompletionRequest, eos_token_ids: tuple[int, ...]) -> pb.GenerateRequest:
    native = _native(request, eos_token_ids)
    for index, message in enumerate(request.messages):
        native.messages.messages.append(pb.ChatMessage(role=message.role, content=message_text(message, index)))
    if request.max_completion_tokens is not None:
        native.parameters.max_new_tokens = request.max_completion_tokens
    if request.top_logprobs and not request.logprobs:
        raise ValidationError("top_logprobs", "needs logprobs: true")
    if request.logprobs:
        native.return_logprobs = True
        native.top_logprobs = request.top_logprobs or 0
    return native


def message_text(message: ChatMessage, index: int) -> str:
    """A message's text: a string, or content parts of type text (images and audio are refused)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValidationError(f"messages[{index}].content", "only text content parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def _native(request: SamplingRequest, eos_token_ids: tuple[int, ...]) -> pb.GenerateRequest:
    for name, reason in REFUSED.items():
        if name in (request.model_extra or {}):
            raise ValidationError(name, reason)
    extras = set(request.model_extra or {}) - NATIVE_PARAMETERS
    if extras:
        raise ValidationError(sorted(extras)[0], "unknown parameter")
    if request.tool_choice not in (None, "none"):
        raise ValidationError("tool_choice", "tool calling is not supported")
    if request.best_of is not None and request.best_of != request.n:
        raise ValidationError("best_of", f"must equal n ({request.n}): genserve returns every sample it draws")
    native = pb.GenerateRequest(return_token_ids=True, num_return_sequences=request.n)
    parameters = native.parameters
    for name, value in (request.model_extra or {}).items():
        _set_native(parameters, name, value)
    if request.max_tokens is not None:
        parameters.max_new_tokens = request.max_tokens
    # OpenAI samples at temperature 1 unless told otherwise; 0 is greedy.
    temperature = 1.0 if request.temperature is None else float(request.temperature)
    if "do_sample" not in (request.model_extra or {}):
        parameters.do_sample = temperature > 0
    if temperature > 0:
        parameters.temperature = temperature
    for name in ("top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        value = getattr(request, name)
        if value is not None:
            setattr(parameters, name, value)
    if request.top_k is not None:
        parameters.top_k = max(0, request.top_k)
    if request.min_tokens is not None:
        parameters.min_new_tokens = request.min_tokens
    if request.ignore_eos is not None:
        parameters.ignore_eos = request.ignore_eos
    if request.stop is not None:
        parameters.stop_strings.extend([request.stop] if isinstance(request.stop, str) else request.stop)
    if request.stop_token_ids:
        parameters.eos_token_id.extend([*eos_token_ids, *request.stop_token_ids])  # vLLM's: besides the model's
    for token, bias in (request.logit_bias or {}).items():
        if not token.lstrip("-").isdigit():
            raise ValidationError("logit_bias", f"keys are token ids, got {token!r}")
        parameters.logit_bias[int(token)] = bias
    native.priority = pb.BATCH if request.priority > 0 else pb.INTERACTIVE
    if request.cache_salt:
        native.cache_salt = request.cache_salt
    _constrain(native, request)
    return native


def _set_native(parameters: pb.GenerationParameters, name: str, value: object) -> None:
    field = pb.GenerationParameters.DESCRIPTOR.fields_by_name[name]
    try:
        if field.label == field.LABEL_REPEATED:
            getattr(parameters, name).extend(value)
        else:
            setattr(parameters, name, value)
    except (TypeError, ValueError) as error:
        raise ValidationError(name, f"wrong type: {error}") from None


def _constrain(native: pb.GenerateRequest, request: SamplingRequest) -> None:
    """response_format, vLLM's guided_* parameters and structured_outputs: at most one, as a constraint."""
    found: list[tuple[str, str, object]] = []
    if request.response_format is not None and request.response_format.type != "text":
        form = request.response_format
        if form.type == "json_object":
            found.append(("response_format", "json_schema", "{}"))
        else:
            schema = (form.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValidationError("response_format.json_schema.schema", "a JSON schema object is required")
            found.append(("response_format", "json_schema", json.dumps(schema)))
    guided = request.structured_outputs
    for name, kind, value in (
        ("guided_json", "json_schema", request.guided_json),
        ("guided_regex", "regex", request.guided_regex),
        ("guided_choice", "choice", request.guided_choice),
        ("guided_grammar", "grammar", request.guided_grammar),
        ("structured_outputs.json", "json_schema", guided.json_ if guided else None),
        ("structured_outputs.regex", "regex", guided.regex if guided else None),
        ("structured_outputs.choice", "choice", guided.choice if guided else None),
        ("structured_outputs.grammar", "grammar", guided.grammar if guided else None),
    ):
        if value is not None:
            found.append((name, kind, json.dumps(value) if isinstance(value, dict) else value))
    if len(found) > 1:
        raise ValidationError(found[1][0], f"only one output constraint per request; {found[0][0]} is set")
    if found:
        _, kind, value = found[0]
        if kind == "choice":
            native.constraint.choice.choices.extend(value)
        else:
            setattr(native.constraint, kind, value)


# Responses: engine outputs -> OpenAI JSON.
def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def envelope(kind: str, identifier: str, model: str, choices: list[dict], created: int | None = None) -> dict:
    return {
        "id": identifier,
        "object": kind,
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
    }


class TokenText:
    """Token strings for logprobs, as the tokenizer decodes each token alone."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    def chat_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                entry(item.token_id, item.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in item.top]}
                for item in logprobs
            ]
        }

    def completion_logprobs(self, logprobs: tuple[TokenLogprob, ...], text_offset: int) -> dict:
        tokens, offsets = [], []
        for item in logprobs:
            tokens.append(self(item.token_id))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [item.logprob for item in logprobs],
            "top_logprobs": [{self(t): lp for t, lp in item.top} for item in logprobs],
            "text_offset": offsets,
        }


def finish_reason(output: GenerationOutput) -> str | None:
    return FINISH_REASONS[output.finish_reason] if output.finish_reason is not None else None
