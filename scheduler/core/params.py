"""Per-request generation parameters: names and defaults follow `transformers.GenerationConfig`.

Resolution order is the one `model.generate(**kwargs)` uses: library defaults, then the model's own
`generation_config`, then what the request sets. Validation happens once, here, and every error names its field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MAX_SPECULATIVE = 16  # tokens proposed per step at most (speculation.MAX_SPECULATIVE_TOKENS)
# vLLM and TGI give a generous default; transformers' own default (max_length=20 in total) truncates most answers.
DEFAULT_MAX_NEW_TOKENS = 256


class ValidationError(ValueError):
    """A request field has a value the engine cannot serve; `field` names it for the client."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class GenerationParameters:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    top_h: float | None = None  # entropy-bounded top-h sampling (TopHLogitsWarper); None disables
    epsilon_cutoff: float = 0.0  # 0 disables, as in GenerationConfig
    eta_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    eos_token_id: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    max_time: float | None = None
    seed: int | None = None
    ignore_eos: bool = False
    # OpenAI semantics, as TGI and vLLM users know them: over generated tokens only, after the HF processors.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    allowed_token_ids: tuple[int, ...] = ()  # when set, every generated token is one of these
    guidance_scale: float | None = None  # classifier-free guidance; None or 1 disables it
    # Speculative decoding (greedy rows): tokens proposed per step by prompt lookup / by the assistant model.
    prompt_lookup_num_tokens: int = 0
    num_assistant_tokens: int | None = None  # None: the server's default when it has an assistant model

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        _check_float("temperature", self.temperature, minimum=0.0)
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p, minimum=0.0, exclusive_minimum=True, maximum=1.0)
        if self.min_p is not None:
            _check_float("min_p", self.min_p, minimum=0.0, maximum=1.0)
        _check_float("typical_p", self.typical_p, minimum=0.0, exclusive_minimum=True, maximum=1.0)
        if self.top_h is not None:
            _check_float("top_h", self.top_h, minimum=0.0, exclusive_minimum=True, maximum=1.0)
        for name in ("epsilon_cutoff", "eta_cutoff"):
            _check_float(name, getattr(self, name), minimum=0.0, maximum=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, minimum=0.0, exclusive_minimum=True)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        for sequence in self.bad_words_ids:
            if not sequence:
                raise ValidationError("bad_words_ids", "every banned sequence needs at least one token id")
            for token_id in sequence:
                _check_int("bad_words_ids", token_id, minimum=0)
        for token_id in self.eos_token_id:
            _check_int("eos_token_id", token_id, minimum=0)
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValidationError("stop_strings", "stop strings must be non-empty strings")
        if self.max_time is not None:
            _check_float("max_time", self.max_time, minimum=0.0, exclusive_minimum=True)
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0, maximum=2**63 - 1)
        _check_float("presence_penalty", self.presence_penalty, minimum=-2.0, maximum=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, minimum=-2.0, maximum=2.0)
        for token_id, bias in self.logit_bias:
            _check_int("logit_bias", token_id, minimum=0)
            _check_float("logit_bias", bias, minimum=-100.0, maximum=100.0)
        _check_int("prompt_lookup_num_tokens", self.prompt_lookup_num_tokens, minimum=0, maximum=MAX_SPECULATIVE)
        if self.num_assistant_tokens is not None:
            _check_int("num_assistant_tokens", self.num_assistant_tokens, minimum=0, maximum=MAX_SPECULATIVE)
        if self.guidance_scale is not None:
            _check_float("guidance_scale", self.guidance_scale, minimum=0.0, maximum=100.0)
        for token_id in self.allowed_token_ids:
            _check_int("allowed_token_ids", token_id, minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValidationError("min_new_tokens", "must not exceed max_new_tokens")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    @property
    def allows_speculation(self) -> bool:
        """Greedy, and every processor it uses is the same at every position (masks and biases), so the picks
        at all verified positions come from one batched pass."""
        return not (
            self.is_sampling
            or self.uses_guidance
            or self.repetition_penalty != 1.0
            or self.no_repeat_ngram_size
            or any(len(words) > 1 for words in self.bad_words_ids)
            or self.min_new_tokens
            or self.presence_penalty
            or self.frequency_penalty
        )

    @property
    def is_sampling(self) -> bool:
        """temperature 0 means greedy, as in vLLM and TGI, whatever do_sample says."""
        return self.do_sample and self.temperature > 0.0

    def validate_for_model(self, vocab_size: int) -> None:
        checked = (
            ("eos_token_id", self.eos_token_id),
            ("bad_words_ids", _flatten(self.bad_words_ids)),
            ("logit_bias", [token_id for token_id, _ in self.logit_bias]),
            ("allowed_token_ids", self.allowed_token_ids),
        )
        for name, ids in checked:
            for token_id in ids:
                if token_id >= vocab_size:
                    raise ValidationError(name, f"token id {token_id} is outside the vocabulary (size {vocab_size})")

    @classmethod
    def resolve(cls, model_defaults: dict[str, Any], overrides: dict[str, Any]) -> GenerationParameters:
        """Merge like `generate(**kwargs)`: the request's values win over the model's, which win over ours."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            name = sorted(unknown)[0]
            raise ValidationError(name, "unknown generation parameter")
        merged = {k: v for k, v in model_defaults.items() if k in known and v is not None}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**_normalize(merged))


def model_generation_defaults(generation_config: Any) -> dict[str, Any]:
    """The fields of a model's `GenerationConfig` that the model (not the library) set."""
    if generation_config is None:
        return {}
    values = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else {}
    defaults = {k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(GenerationParameters)}}
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is not None:
        defaults["eos_token_id"] = eos
    return defaults


def _normalize(values: dict[str, Any]) -> dict[str, Any]:
    """Accept the shapes `GenerationConfig` accepts (an int or list for eos, lists for bad words)."""
    out = dict(values)
    eos = out.get("eos_token_id")
    if eos is not None:
        out["eos_token_id"] = (eos,) if isinstance(eos, int) else tuple(eos)
    if "bad_words_ids" in out:
        try:
            out["bad_words_ids"] = tuple(tuple(seq) for seq in out["bad_words_ids"])
        except TypeError:
            raise ValidationError("bad_words_ids", "must be a list of token-id lists") from None
    if "logit_bias" in out:
        bias = out["logit_bias"]
        try:
            pairs = bias.items() if isinstance(bias, dict) else bias
            out["logit_bias"] = tuple(sorted((int(token), float(value)) for token, value in pairs))
        except (TypeError, ValueError):
            raise ValidationError("logit_bias", "must map token ids to numbers") from None
    if "allowed_token_ids" in out:
        out["allowed_token_ids"] = tuple(sorted(set(out["allowed_token_ids"])))
    if "stop_strings" in out:
        stops = out["stop_strings"]
        out["stop_strings"] = (stops,) if isinstance(stops, str) else tuple(stops)
    return out


def _flatten(sequences: tuple[tuple[int, ...], ...]) -> list[int]:
    return [token for sequence in sequences for token in sequence]


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(name, f"must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValidationError(name, f"must be {bound}, got {value}")


def _check_float(
    name: str,
    value: Any,
    minimum: float,
    exclusive_minimum: bool = False,
    maximum: float | None = None,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(name, f"must be a finite number, got {value!r}")
    too_low = value <= minimum if exclusive_minimum else value < minimum
    if too_low or (maximum is not None and value > maximum):
        low = "(" if exclusive_minimum else "["
        high = f"{maximum}]" if maximum is not None else "inf)"
        raise ValidationError(name, f"must be in {low}{minimum}, {high}, got {value}")


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GenerationParameters", "ValidationError", "model_generation_defaults"]
