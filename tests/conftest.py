"""Shared fixtures: a tiny random-weights Llama built from a config, and the real default model (loaded once)."""

from __future__ import annotations

import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import FinishReason, RequestOptions, TokenEvent
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.loader import LoadedModel, load_model
from tests.architectures import COMMON, EOS, VOCAB
from tests.references import plain_reference, with_plain_reference

TINY_VOCAB = VOCAB
TINY_EOS = EOS


def tiny_model(seed: int = 0, max_position_embeddings: int = 1024) -> LlamaForCausalLM:
    """The parity suite's Llama shape, with HF's default initializer range (0.02)."""
    torch.manual_seed(seed)
    shape = COMMON | dict(max_position_embeddings=max_position_embeddings, initializer_range=0.02)
    return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for the tiny model: ids 0-2 special, one token per byte after them (259 < 320)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": TINY_EOS}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tiny: LoadedModel) -> LoadedModel:
    """The same tiny model, with text in and out (for what needs a tokenizer: constraints, text prompts)."""
    return LoadedModel(model=tiny.model, tokenizer=byte_tokenizer(), name="tiny-llama-bytes")


@pytest.fixture(scope="session")
def default_model() -> LoadedModel:
    loaded = load_model("default")
    with_plain_reference(loaded.model)
    return loaded


def hf_generate(model: torch.nn.Module, prompt: list[int], params: GenerationParameters) -> list[int]:
    """The reference: `model.generate()` on this request alone, with the same parameters, on the plain copy of
    `model` kept by `with_plain_reference` (or on `model` itself, while no engine has packed it)."""
    model = plain_reference(model)
    kwargs = dict(
        max_new_tokens=params.max_new_tokens,
        do_sample=params.is_sampling,
        eos_token_id=[] if params.ignore_eos else list(params.eos_token_id),
        pad_token_id=model.generation_config.pad_token_id or 0,
    )
    if params.min_new_tokens:
        kwargs["min_new_tokens"] = params.min_new_tokens
    if params.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = params.repetition_penalty
    if params.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = params.no_repeat_ngram_size
    if params.bad_words_ids:
        kwargs["bad_words_ids"] = [list(b) for b in params.bad_words_ids]
    if params.is_sampling:
        kwargs.update(
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, typical_p=params.typical_p
        )
        if params.min_p is not None:
            kwargs["min_p"] = params.min_p
        kwargs.update(epsilon_cutoff=params.epsilon_cutoff, eta_cutoff=params.eta_cutoff, top_h=params.top_h)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt], device=model.device), **kwargs)
    return output[0, len(prompt) :].tolist()


class StepDriver:
    """Drives an Engine step by step in the test's thread, recording every event per request."""

    def __init__(self, loaded: LoadedModel, assistant: LoadedModel | None = None, **config: object) -> None:
        """`config`: EngineConfig fields. GENSERVE_TEST_DECODE_MODE=compiled runs every driver that does not set its
        own decode_mode in the compiled decode step (the parity suite in that mode: README, "--compile")."""
        config.setdefault("decode_mode", os.environ.get("GENSERVE_TEST_DECODE_MODE", "auto"))
        self.engine = Engine(loaded, EngineConfig(**config), assistant=assistant)
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason | None] = {}
        self.errors: dict[str, str] = {}
        self.engine.on_events = self._record

    def _record(self, events: list[TokenEvent]) -> None:
        for event in events:
            self.tokens.setdefault(event.request_id, []).extend(event.token_ids)
            if event.finish_reason is not None:
                self.finish[event.request_id] = event.finish_reason
            if event.error is not None:
                self.errors[event.request_id] = event.error

    def submit(self, request_id: str, prompt: list[int], **overrides: object) -> GenerationParameters:
        """`overrides`: generation parameters, and `options`, a dict of RequestOptions fields."""
        options = dict(overrides.pop("options", {}))
        params = self.engine.make_parameters(**overrides)
        self.engine.submit(prompt, params, RequestOptions(request_id=request_id, **options))
        return params

    def run(
        self, schedule: dict[int, list[tuple[str, list[int], dict]]] | None = None, max_steps: int = 10_000
    ) -> None:
        """Step until idle; `schedule` maps a step number to the requests submitted just before it."""
        schedule = dict(schedule or {})
        for step in range(max_steps):
            for request_id, prompt, overrides in schedule.pop(step, []):
                self.submit(request_id, prompt, **overrides)
            if not self.engine.step() and not schedule:
                return
        raise AssertionError("engine did not become idle")
