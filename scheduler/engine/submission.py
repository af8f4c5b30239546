"""Turning a caller's request into a validated `Sequence`, on the caller's thread: everything that can be refused
is refused here, before it is queued (a bad field raises ValidationError naming it; an unreachable deadline
raises DeadlineUnreachableError)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.errors import UnknownAdapterError
from genserve.scheduler.core.kv_blocks import BlockPool
from genserve.scheduler.core.load_estimator import LoadEstimator
from genserve.scheduler.core.params import MAX_SPECULATIVE, GenerationParameters, ValidationError
from genserve.scheduler.core.request import RequestOptions, Sequence
from genserve.scheduler.features.plugins import PluginRegistry

MAX_TOP_LOGPROBS = 20


class DeadlineUnreachableError(RuntimeError):
    """The request cannot get its first token before its deadline; refused before it costs any prefill."""


@dataclasses.dataclass(frozen=True)
class QueueState:
    """What a deadline check needs to know about the work ahead of a new request."""

    requests_ahead: int
    tokens_ahead: int
    free_rows: int


class Submission:
    def __init__(
        self,
        config: EngineConfig,
        model_defaults: dict[str, object],
        vocab_size: int,
        has_assistant: bool,
        plugins: PluginRegistry,
        kv_blocks: BlockPool | None = None,
        adapters: Mapping[str, object] = MappingProxyType({}),
    ) -> None:
        """`kv_blocks`: the paged KV cache's pool (None: a slot per row, which the context check covers);
        `adapters`: the LoRA adapters requests may name (the engine's, by name)."""
        self.config = config
        self.adapters = adapters
        self.kv_blocks = kv_blocks
        self.model_defaults = model_defaults
        self.vocab_size = vocab_size
        self.has_assistant = has_assistant
        self.plugins = plugins

    def parameters(self, prompt_length: int | None = None, **overrides: object) -> GenerationParameters:
        """Request overrides on top of the model's generation_config, validated against this model.

        When the request leaves max_new_tokens unset, the default is capped to what fits after the prompt, so
        a long prompt is not refused for a limit the client never asked for."""
        params = GenerationParameters.resolve(self.model_defaults, overrides)
        params.validate_for_model(self.vocab_size)
        if params.num_assistant_tokens is None:
            default = self.config.num_assistant_tokens if self.has_assistant else 0
            params = dataclasses.replace(params, num_assistant_tokens=default)
        elif params.num_assistant_tokens and not self.has_assistant:
            raise ValidationError("num_assistant_tokens", "the server has no assistant model (--assistant-model)")
        if prompt_length is not None and overrides.get("max_new_tokens") is None:
            room = self.config.max_context - prompt_length
            if 1 <= room < params.max_new_tokens:
                params = dataclasses.replace(
                    params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room)
                )
        return params

    def sequence(
        self,
        prompt_ids: list[int],
        params: GenerationParameters,
        options: RequestOptions,
        grammar: object | None,
        estimator: LoadEstimator,
        queue: QueueState,
    ) -> Sequence:
        top_logprobs = options.top_logprobs
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValidationError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        self._check_prompt("input_ids", prompt_ids, params.max_new_tokens)
        if options.adapter and options.adapter not in self.adapters:
            raise UnknownAdapterError(options.adapter)
        if options.deadline is not None:
            now = time.monotonic()
            delay = estimator.first_token_delay(
                queue.requests_ahead, queue.tokens_ahead, queue.free_rows, len(prompt_ids), now=now
            )
            if now + delay > options.deadline:
                raise DeadlineUnreachableError(
                    f"the first token is expected in {delay:.3f} s but the deadline is in "
                    f"{options.deadline - now:.3f} s"
                )
        seq = self.build(options.request_id or uuid.uuid4().hex, prompt_ids, params, options, grammar)
        self._check_kv_capacity(seq)
        return seq

    def build(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: GenerationParameters,
        options: RequestOptions,
        grammar: object | None,
        arrival_time: float | None = None,
    ) -> Sequence:
        """The request's `Sequence`, its own custom components and guidance companion included. Unchecked: a
        tensor-parallel follower rebuilds here what the leader's `sequence()` accepted."""
        seq = Sequence(
            request_id,
            list(prompt_ids),
            params,
            options=options,
            custom_processors=self.plugins.instantiate("logits_processors", options.logits_processors),
            custom_criteria=self.plugins.instantiate("stopping_criteria", options.stopping_criteria),
            grammar=grammar,
        )
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if params.uses_guidance:
            seq.companion = self._guidance_companion(seq)
        return seq

    def _check_kv_capacity(self, seq: Sequence) -> None:
        """A request the whole paged cache could not hold at its longest is refused now, not failed later."""
        pool = self.kv_blocks
        if pool is None:
            return
        members = (seq,) if seq.companion is None else (seq, seq.companion)
        # At its longest, with a speculative step's spare positions.
        needed = sum(
            pool.blocks_for(m.num_prompt_tokens + seq.params.max_new_tokens + MAX_SPECULATIVE) for m in members
        )
        if needed > pool.num_blocks:
            raise ValidationError(
                "max_new_tokens",
                f"the request may hold up to {needed * pool.block_size} KV positions; the server's KV cache holds "
                f"{pool.capacity_tokens} in all (--kv-cache-memory)",
            )

    def _check_prompt(self, field_name: str, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise ValidationError(field_name, "the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValidationError(field_name, f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        if len(prompt_ids) >= self.config.max_context:
            raise ValidationError(
                field_name, f"the prompt has {len(prompt_ids)} tokens; the context holds {self.config.max_context}"
            )
        if len(prompt_ids) + max_new_tokens > self.config.max_context:
            room = self.config.max_context - len(prompt_ids)
            raise ValidationError(
                "max_new_tokens",
                f"{max_new_tokens} new tokens after a {len(prompt_ids)}-token prompt exceed the context of "
                f"{self.config.max_context} (at most {room} fit)",
            )

    def _guidance_companion(self, seq: Sequence) -> Sequence:
        """The unconditional branch of classifier-free guidance: the negative prompt (or, as generate() does
        without one, the prompt's last token) followed by the request's own generated tokens."""
        negative = seq.options.negative_prompt_ids
        if negative is not None:
            self._check_prompt("negative_prompt", list(negative), seq.params.max_new_tokens)
        if self.config.max_running < 2:
            raise ValidationError("guidance_scale", "classifier-free guidance needs two batch rows; the server has one")
        return Sequence(
            f"{seq.request_id}/unconditional",
            list(negative) if negative is not None else seq.prompt_ids[-1:],
            GenerationParameters(max_new_tokens=seq.params.max_new_tokens),
            generated_ids=seq.generated_ids,  # the same list: it always follows its request's tokens
            options=RequestOptions(cache_salt=seq.options.cache_salt, adapter=seq.options.adapter),
            is_companion=True,
        )
