"""The engine: a thread that loops admit -> step -> report, between the scheduler and the model runner.

Callers on any thread `submit()` (validated at once: a bad request or a full queue raises right there) and
`cancel()`; both only touch thread-safe structures and wake the loop. After every step the engine hands the
step's `TokenEvent`s, all at once, to the `on_events` callback (the async front end forwards them to its loop).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scheduler.constraints import GrammarCompiler
from scheduler.load_estimator import LoadEstimator
from scheduler.model_loader import LoadedModel
from scheduler.params import GenerationParameters, ValidationError, model_generation_defaults
from scheduler.plugins import PluginRegistry
from scheduler.request import FinishReason, Priority, RequestOptions, Sequence, TokenEvent
from scheduler.runner import ModelRunner, StopCode, TokenCounters, is_out_of_memory
from scheduler.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
# After an out-of-memory the row limit shrinks; it grows back by one row per this many clean steps.
STEPS_TO_REGROW_ONE_ROW = 200
_STOP_REASONS = {
    StopCode.EOS_TOKEN: FinishReason.EOS_TOKEN,
    StopCode.LENGTH: FinishReason.LENGTH,
    StopCode.STOPPING_CRITERIA: FinishReason.STOPPING_CRITERIA,
    StopCode.CONSTRAINT_COMPLETE: FinishReason.CONSTRAINT_COMPLETE,
}


class DeadlineUnreachableError(RuntimeError):
    """The request cannot get its first token before its deadline; refused before it costs any prefill."""


@dataclass(frozen=True)
class StepStats:
    num_prefilled: int
    num_rows: int
    seconds: float
    queue_waits: tuple[tuple[Priority, float], ...]  # arrival to prefill, for each request admitted this step
    num_preempted: int = 0  # batch rows that yielded to interactive requests before this step
    tokens: TokenCounters = TokenCounters()  # this step's prefix-cache and speculation figures


@dataclass(frozen=True)
class LoadReport:
    """The engine's load as a client or a load balancer would want it (gRPC ORCA trailers, RetryInfo)."""

    queue_size: int
    running_requests: int
    max_running: int
    kv_cache_usage_ratio: float
    tokens_in_flight: int
    retry_delay_seconds: float


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: SchedulerConfig = SchedulerConfig(),
        seed: int = 0,
        plugins: PluginRegistry = PluginRegistry(),
        prefix_cache_tokens: int = 0,
        assistant: LoadedModel | None = None,
        num_assistant_tokens: int = 4,
        decode_mode: str = "auto",
        speculation_max_rows: int = 16,
    ) -> None:
        """`prefix_cache_tokens` > 0 enables prefix caching with a pool of that many tokens (see prefix_cache.py).
        `assistant` is a draft model for speculative decoding; greedy requests use it with `num_assistant_tokens`
        proposals per step unless they set their own (0 turns it off). `decode_mode`, `speculation_max_rows`:
        see ModelRunner."""
        self.plugins = plugins
        self.loaded = loaded
        self.config = config
        if assistant is not None:
            _check_assistant(loaded, assistant)
        self.runner = ModelRunner(
            loaded.model,
            config.max_running,
            config.max_context,
            seed=seed,
            prefix_cache_tokens=prefix_cache_tokens,
            assistant_model=assistant.model if assistant is not None else None,
            decode_mode=decode_mode,
            speculation_max_rows=speculation_max_rows,
        )
        self.num_assistant_tokens = num_assistant_tokens if assistant is not None else 0
        self.assistant_name = assistant.name if assistant is not None else ""
        self.scheduler = Scheduler(config)
        self.model_defaults = model_generation_defaults(loaded.model.generation_config)
        self.grammars = GrammarCompiler(loaded.tokenizer, self.runner.vocab_size)
        self.on_events: Callable[[list[TokenEvent]], None] = lambda events: None
        self.on_step: Callable[[StepStats], None] = lambda stats: None
        self._cancels: list[tuple[str, FinishReason]] = []
        self._cancel_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.row_limit = config.max_running  # lowered after an out-of-memory, regrown slowly
        self._clean_steps = 0
        self.estimator = LoadEstimator()
        self.num_prefilled = 0  # requests prefilled since start (a refused or dropped request never counts)

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def num_running(self) -> int:
        return self.runner.num_rows

    @property
    def free_rows(self) -> int:
        return max(0, self.row_limit - self.runner.num_slots)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def make_parameters(self, prompt_length: int | None = None, **overrides: object) -> GenerationParameters:
        """Request overrides on top of the model's generation_config, validated against this model.

        When the request leaves max_new_tokens unset, the default is capped to what fits after the prompt, so
        a long prompt is not refused for a limit the client never asked for."""
        params = GenerationParameters.resolve(self.model_defaults, overrides)
        params.validate_for_model(self.vocab_size)
        if params.num_assistant_tokens is None:
            params = dataclasses.replace(params, num_assistant_tokens=self.num_assistant_tokens)
        elif params.num_assistant_tokens and self.runner.draft is None:
            raise ValidationError("num_assistant_tokens", "the server has no assistant model (--assistant-model)")
        if prompt_length is not None and overrides.get("max_new_tokens") is None:
            room = self.config.max_context - prompt_length
            if 1 <= room < params.max_new_tokens:
                params = dataclasses.replace(
                    params, max_new_tokens=room, min_new_tokens=min(params.min_new_tokens, room)
                )
        return params

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParameters,
        options: RequestOptions = RequestOptions(),
        grammar: object | None = None,
    ) -> Sequence:
        """Queue a request. `grammar` is its own matcher from `self.grammars` when its output is constrained."""
        top_logprobs = options.top_logprobs
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValidationError("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")
        self._check_prompt("input_ids", prompt_ids, params.max_new_tokens)
        if options.deadline is not None:
            self._check_deadline_reachable(len(prompt_ids), options.deadline)
        seq = Sequence(
            options.request_id or uuid.uuid4().hex,
            list(prompt_ids),
            params,
            options=options,
            custom_processors=self.plugins.instantiate("logits_processors", options.logits_processors),
            custom_criteria=self.plugins.instantiate("stopping_criteria", options.stopping_criteria),
            grammar=grammar,
        )
        if params.uses_guidance:
            seq.companion = self._guidance_companion(seq)
        self.scheduler.add(seq)
        self._wakeup.set()
        return seq

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
            is_companion=True,
        )

    def _check_deadline_reachable(self, num_prompt_tokens: int, deadline: float) -> None:
        now = time.monotonic()
        delay = self.estimator.first_token_delay(
            requests_ahead=self.num_waiting,
            tokens_ahead=self.scheduler.num_waiting_tokens,
            free_rows=self.free_rows,
            own_tokens=num_prompt_tokens,
            now=now,
        )
        if now + delay > deadline:
            raise DeadlineUnreachableError(
                f"the first token is expected in {delay:.3f} s but the deadline is in {deadline - now:.3f} s"
            )

    def load_report(self) -> LoadReport:
        return LoadReport(
            queue_size=self.num_waiting,
            running_requests=self.num_running,
            max_running=self.config.max_running,
            kv_cache_usage_ratio=self.runner.kv_usage_ratio(),
            tokens_in_flight=self.runner.num_tokens_held(),
            retry_delay_seconds=self.estimator.retry_delay(self.num_waiting),
        )

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        with self._cancel_lock:
            self._cancels.append((request_id, reason))
        self._wakeup.set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="genserve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            if not self.step():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()

    def step(self) -> bool:
        """One scheduling round and one model step; False when there was nothing to do."""
        events = self._apply_cancels() + self._drop_expired()
        num_preempted = self._preempt_batch_rows()
        admitted = self.scheduler.admit(self.runner.num_slots, self.row_limit)
        if not admitted and not self.num_running:
            self._emit(events)
            return False
        started = time.monotonic()
        for seq in admitted:
            seq.start_time = started
        counters_before = self.runner.counters()
        try:
            output = self.runner.step(admitted)
        except Exception as error:  # noqa: BLE001 - one bad step must not kill the engine thread
            if is_out_of_memory(error):
                events += self._recover_from_out_of_memory(admitted)
            else:
                log.exception("engine step failed; failing the %d requests in it", self.num_running + len(admitted))
                events += self._fail_all(admitted, f"{type(error).__name__}: {error}")
            self._emit(events)
            return True
        self._regrow_row_limit()
        for seq, message in output.failed:
            log.error("request %s failed in prefill: %s", seq.request_id, message)
            events.append(_failure(seq, message))
        results = output.results
        now = time.monotonic()
        leaving: set[int] = set()
        for row, (seq, result) in enumerate(zip(self.runner.rows, results)):
            if row in output.row_errors:
                log.error("request %s failed: %s", seq.request_id, output.row_errors[row])
                seq.finish(FinishReason.CANCELLED)  # ended; the error event below tells the client why
                leaving.add(row)
                events.append(_failure(seq, output.row_errors[row]))
                continue
            seq.generated_ids.extend(result.token_ids)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if result.stop in _STOP_REASONS:
                seq.finish(_STOP_REASONS[result.stop])
            elif seq.params.max_time is not None and now - seq.start_time > seq.params.max_time:
                seq.finish(FinishReason.TIME_LIMIT)
            elif seq.options.partial_on_deadline and now + self._deadline_margin() >= seq.options.deadline:
                seq.finish(FinishReason.TIME_LIMIT)
            if seq.is_finished:
                leaving.add(row)
            logprobs = (result.logprob,) if result.logprob is not None else ()
            events.append(
                TokenEvent(
                    seq.request_id, result.token_ids, seq.finish_reason, seq.num_prompt_tokens, logprobs=logprobs
                )
            )
        self.runner.release(leaving)
        self._emit(events)
        self.num_prefilled += len(admitted)
        self.estimator.record_step(now - started, sum(seq.num_tokens for seq in admitted))
        self.estimator.record_finished(len(leaving), now)
        waits = tuple((seq.options.priority, started - seq.arrival_time) for seq in admitted)
        counters = self.runner.counters() - counters_before
        self.on_step(StepStats(len(admitted), len(results), now - started, waits, num_preempted, counters))
        return True

    def _apply_cancels(self) -> list[TokenEvent]:
        with self._cancel_lock:
            cancels, self._cancels = self._cancels, []
        if not cancels:
            return []
        events = []
        rows = {seq.request_id: row for row, seq in enumerate(self.runner.rows)}
        leaving = set()
        for request_id, reason in cancels:
            seq = self.scheduler.remove(request_id)
            if seq is None and request_id in rows:
                leaving.add(rows[request_id])
                seq = self.runner.rows[rows[request_id]]
            if seq is None or seq.is_finished:
                continue  # already ended: a cancel racing a natural finish is a no-op
            seq.finish(reason)
            events.append(TokenEvent(seq.request_id, (), reason, seq.num_prompt_tokens))
        self.runner.release(leaving)
        return events

    def _preempt_batch_rows(self) -> int:
        """Free rows for waiting interactive requests by sending the newest batch rows back to the queue. They
        keep their tokens (and sampler state) and are recomputed when readmitted; nothing they produced is lost."""
        needed = self.scheduler.num_waiting_at(Priority.INTERACTIVE) - self.free_rows
        if needed <= 0:
            return 0
        batch_rows = [row for row, seq in enumerate(self.runner.rows) if seq.options.priority is Priority.BATCH]
        victims = sorted(batch_rows, key=lambda row: self.runner.rows[row].start_time or 0.0, reverse=True)[:needed]
        if not victims:
            return 0
        preempted = [self.runner.rows[row] for row in victims]
        self.runner.release(set(victims))
        self.scheduler.requeue(preempted)
        return len(preempted)

    def _deadline_margin(self) -> float:
        """Stop a partial-results request this early, so its final message reaches the client in time."""
        return 3 * (self.estimator.step_seconds or 0.0) + 0.1

    def _drop_expired(self) -> list[TokenEvent]:
        """Requests whose deadline passed while queued are dropped before any prefill is spent on them."""
        expired = self.scheduler.remove_expired(time.monotonic())
        for seq in expired:
            seq.finish(FinishReason.TIME_LIMIT)
        return [TokenEvent(seq.request_id, (), FinishReason.TIME_LIMIT, seq.num_prompt_tokens) for seq in expired]

    def _recover_from_out_of_memory(self, admitted: list[Sequence]) -> list[TokenEvent]:
        """Shrink to what fits: requeue this step's new requests (or preempt the newest running one, keeping its
        tokens, to be recomputed later) and lower the row limit. A lone request that cannot fit fails instead of
        being retried forever."""
        if admitted:
            victims = admitted
        elif self.num_running:
            newest = max(range(self.num_running), key=lambda row: self.runner.rows[row].start_time or 0.0)
            victims = [self.runner.rows[newest]]
            self.runner.release({newest})
        else:
            victims = []
        self.row_limit = max(1, self.runner.num_slots)
        self._clean_steps = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.num_running == 0 and len(victims) == 1:
            seq = victims[0]
            log.error("request %s does not fit in memory even alone; failing it", seq.request_id)
            return [_failure(seq, "out of memory: the request does not fit")]
        self.scheduler.requeue(victims)
        log.warning("out of memory: requeued %d requests, row limit now %d", len(victims), self.row_limit)
        return []

    def _regrow_row_limit(self) -> None:
        if self.row_limit < self.config.max_running:
            self._clean_steps += 1
            if self._clean_steps >= STEPS_TO_REGROW_ONE_ROW:
                self.row_limit += 1
                self._clean_steps = 0

    def _fail_all(self, admitted: list[Sequence], message: str) -> list[TokenEvent]:
        failed = {id(seq): seq for seq in [*self.runner.rows, *admitted]}.values()
        self.runner.release(set(range(self.num_running)))
        return [_failure(seq, message) for seq in failed]

    def _emit(self, events: list[TokenEvent]) -> None:
        if events:
            self.on_events(events)


def _check_assistant(loaded: LoadedModel, assistant: LoadedModel) -> None:
    """A draft model must speak the same tokens: same vocabulary size and, where both have one, tokenizer."""
    sizes = [model.get_output_embeddings().weight.shape[0] for model in (loaded.model, assistant.model)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the assistant model's vocabulary ({sizes[1]}) differs from the model's ({sizes[0]})")
    if loaded.tokenizer is not None and assistant.tokenizer is not None:
        if loaded.tokenizer.get_vocab() != assistant.tokenizer.get_vocab():
            raise ValueError("the assistant model's tokenizer differs from the model's")


def _failure(seq: Sequence, message: str) -> TokenEvent:
    """The event that ends a request with an error (the client gets INTERNAL with the message)."""
    return TokenEvent(seq.request_id, (), None, seq.num_prompt_tokens, error=message)
