"""Conversions between the protobuf messages and the engine's types, at the service edge only."""

from __future__ import annotations

from typing import Any

from genserve.scheduler import Constraint, FinishReason, GenerationParameters, TokenLogprob, ValidationError
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb

# Every optional scalar of the proto's GenerationParameters is the GenerationParameters field of the same name.
_SCALAR_FIELDS = tuple(
    field.name
    for field in pb.GenerationParameters.DESCRIPTOR.fields
    if field.has_presence and field.message_type is None and field.name in GenerationParameters.__dataclass_fields__
)

FINISH_REASONS = {
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.EOS_TOKEN: pb.EOS_TOKEN,
    FinishReason.STOP_STRING: pb.STOP_STRING,
    FinishReason.TIME_LIMIT: pb.TIME_LIMIT,
    FinishReason.CANCELLED: pb.CANCELLED,
    FinishReason.STOPPING_CRITERIA: pb.STOPPING_CRITERIA,
    FinishReason.CONSTRAINT_COMPLETE: pb.CONSTRAINT_COMPLETE,
}


def parameter_overrides(message: pb.GenerationParameters) -> dict[str, Any]:
    """Only the fields the client set: unset means "the model's default", as with generate(**kwargs)."""
    overrides: dict[str, Any] = {name: getattr(message, name) for name in _SCALAR_FIELDS if message.HasField(name)}
    if message.bad_words_ids:
        overrides["bad_words_ids"] = [list(sequence.ids) for sequence in message.bad_words_ids]
    if message.eos_token_id:
        overrides["eos_token_id"] = list(message.eos_token_id)
    if message.stop_strings:
        overrides["stop_strings"] = list(message.stop_strings)
    if message.logit_bias:
        overrides["logit_bias"] = dict(message.logit_bias)
    return overrides


def parameters_to_proto(params: GenerationParameters) -> pb.GenerationParameters:
    message = pb.GenerationParameters(
        bad_words_ids=[pb.TokenIds(ids=list(b)) for b in params.bad_words_ids],
        eos_token_id=list(params.eos_token_id),
        stop_strings=list(params.stop_strings),
        logit_bias=dict(params.logit_bias),
    )
    for name in _SCALAR_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    return message


def constraint_from_proto(message: pb.Constraint) -> tuple[Constraint | None, list[int]]:
    """A grammar constraint for llguidance, or the allowed token ids (a plain per-row mask, no grammar)."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise ValidationError("constraint", "set one of regex, json_schema, choice, grammar or allowed_token_ids")
    if kind == "allowed_token_ids":
        if not message.allowed_token_ids.ids:
            raise ValidationError("allowed_token_ids", "give at least one token id")
        return None, list(message.allowed_token_ids.ids)
    if kind == "choice":
        return Constraint.choice(list(message.choice.choices)), []
    spec = getattr(message, kind)
    if not spec:
        raise ValidationError(kind, "is empty")
    return Constraint(kind, spec), []


def chat_messages(message: pb.ChatMessages, allowed_roles: frozenset[str]) -> list[dict[str, str]]:
    if not message.messages:
        raise ValidationError("messages", "at least one message is required")
    for i, item in enumerate(message.messages):
        if item.role not in allowed_roles:
            roles = ", ".join(sorted(allowed_roles))
            raise ValidationError(f"messages[{i}].role", f"unknown role {item.role!r}; expected one of {roles}")
    return [{"role": item.role, "content": item.content} for item in message.messages]


def logprobs_to_proto(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=item.token_id,
            logprob=item.logprob,
            top=[pb.TopLogprob(token_id=token_id, logprob=logprob) for token_id, logprob in item.top],
            rank=item.rank,
        )
        for item in logprobs
    ]
