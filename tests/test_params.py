"""Validation names the field; resolution follows generate(**kwargs): request > model generation_config > defaults."""

from __future__ import annotations

import math

import pytest

from genserve.scheduler.core.params import DEFAULT_MAX_NEW_TOKENS, GenerationParameters, ValidationError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("max_new_tokens", 0),
        ("min_new_tokens", -2),
        ("typical_p", 0.0),
        ("min_p", 1.2),
        ("repetition_penalty", 0.0),
        ("no_repeat_ngram_size", -1),
        ("max_time", -1.0),
        ("seed", -5),
        ("max_new_tokens", 3.5),
        ("eos_token_id", [-1]),
        ("bad_words_ids", [[]]),
        ("stop_strings", [""]),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("logit_bias", {5: 500.0}),
        ("logit_bias", {"x": 1.0}),
        ("top_h", 0.0),
        ("top_h", 1.5),
    ],
)
def test_invalid_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as error:
        GenerationParameters.resolve({}, {field: value})
    assert error.value.field == field
    assert field in str(error.value)


def test_unknown_parameter_is_rejected() -> None:
    with pytest.raises(ValidationError, match="top_q"):
        GenerationParameters.resolve({}, {"top_q": 0.5})


def test_request_overrides_model_defaults_which_override_library_defaults() -> None:
    model = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": 2, "pad_token_id": 0}
    params = GenerationParameters.resolve(model, {"top_p": 0.5, "bad_words_ids": [[7, 8]]})
    assert params.temperature == 0.6  # model
    assert params.top_p == 0.5  # request
    assert params.top_k == 50  # library default, as GenerationConfig
    assert params.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert params.eos_token_id == (2,)
    assert params.bad_words_ids == ((7, 8),)


def test_temperature_zero_means_greedy() -> None:
    assert not GenerationParameters(do_sample=True, temperature=0.0).is_sampling
    assert GenerationParameters(do_sample=True, temperature=0.5).is_sampling
    assert not GenerationParameters(temperature=0.5).is_sampling  # do_sample decides, as in generate()


def test_ids_checked_against_vocabulary() -> None:
    params = GenerationParameters(bad_words_ids=((5, 500),))
    with pytest.raises(ValidationError) as error:
        params.validate_for_model(vocab_size=100)
    assert error.value.field == "bad_words_ids"


def test_min_new_tokens_cannot_exceed_max() -> None:
    with pytest.raises(ValidationError, match="min_new_tokens"):
        GenerationParameters(max_new_tokens=5, min_new_tokens=6)
