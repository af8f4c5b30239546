"""The engine: a thread that loops plan -> execute -> update, between the scheduler and the model runner.

    scheduler.schedule()  ->  StepPlan     who is released, which prompt chunks and decode rows run, speculation
    runner.execute(plan)  ->  ModelOutput  the step's tokens, keyed by request id (one device-to-host copy)
    scheduler.update(...) ->  events       tokens appended, every finish decided; the engine frees ended rows

Callers on any thread `submit()` (validated at once: a bad request or a full queue raises right there) and
`cancel()`; both only touch thread-safe structures and wake the loop. With tensor parallelism (lockstep.py) every
rank runs an engine: the leader's submits and cancels reach every rank's scheduler at the start of the next step.
After every step the engine hands the step's `TokenEvent`s to `on_events` (the async front end forwards them to
its loop) and publishes an immutable `EngineSnapshot` that metrics, load reports and admission checks read instead
of live engine state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.errors import EngineDeadError
from genserve.scheduler.core.load_estimator import LoadEstimator
from genserve.scheduler.core.params import GenerationParameters, model_generation_defaults
from genserve.scheduler.core.request import FinishReason, RequestOptions, Sequence, TokenEvent
from genserve.scheduler.core.scheduler import Scheduler
from genserve.scheduler.core.snapshot import EngineSnapshot, LoadReport, ModelDescription, StepStats, TokenCounters
from genserve.scheduler.core.step_plan import ModelOutput, StepPlan
from genserve.scheduler.engine.lockstep import HEARTBEAT_SECONDS, Arrival, Cancellation, Lockstep, StepInputs
from genserve.scheduler.engine.submission import QueueState, Submission
from genserve.scheduler.features.constraints import GrammarCompiler
from genserve.scheduler.features.plugins import PluginRegistry
from genserve.scheduler.model.draft_model import check_assistant
from genserve.scheduler.model.loader import LoadedModel
from genserve.scheduler.model.lora_adapters import LoraAdapter, read_adapter
from genserve.scheduler.model.lora_registry import AdapterRegistry
from genserve.scheduler.model.out_of_memory import is_out_of_memory
from genserve.scheduler.model.runner import ModelRunner

log = logging.getLogger(__name__)

LOST_RANK_GRACE_SECONDS = 0.5


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig = EngineConfig(),
        plugins: PluginRegistry = PluginRegistry(),
        assistant: LoadedModel | None = None,
        lockstep: Lockstep | None = None,
    ) -> None:
        """`assistant` is a draft model for speculative decoding; greedy requests use it with
        `config.num_assistant_tokens` proposals per step unless they set their own (0 turns it off).
        `lockstep`: this rank's place in a tensor-parallel group (None: the engine runs alone)."""
        if assistant is not None:
            check_assistant(loaded, assistant)
        self.loaded = loaded
        self.config = config
        modules = {name: Path(path) for name, path in config.lora_modules}
        lora_dir = Path(config.lora_dir) if config.lora_dir else None
        # The LoRA adapters requests may name; those in memory are what the runner and submission read.
        self.adapters = AdapterRegistry(self._read_adapter, modules, lora_dir, config.max_cpu_loras)
        self.adapter_loads: list[tuple[str, float]] = []  # (adapter, seconds its reading took), in load order
        self.on_adapter_loaded: Callable[[str, float], None] = lambda name, seconds: None
        self.runner = ModelRunner(
            loaded.model, config, assistant.model if assistant is not None else None, adapters=self.adapters
        )
        for name in modules:  # AdapterError says which one cannot be served, and why
            self.adapters.load(name)
        self.assistant_name = assistant.name if assistant is not None else ""
        self.scheduler = Scheduler(config, self.runner.blocks)
        defaults = model_generation_defaults(loaded.model.generation_config)
        self.submission = Submission(
            config, defaults, self.vocab_size, assistant is not None, plugins, self.scheduler.blocks, self.adapters
        )
        self.grammars = GrammarCompiler(loaded.tokenizer, self.vocab_size)
        self.estimator = LoadEstimator()
        self.on_events: Callable[[list[TokenEvent]], None] = lambda events: None
        self.on_step: Callable[[StepStats], None] = lambda stats: None
        self._publish([])  # the first snapshot: an idle engine
        self.num_prefilled = 0  # requests prefilled since start (a refused or dropped request never counts)
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.lockstep = lockstep
        # Tensor parallelism: the leader's submits and cancels, in order, until the next step shares them.
        self._arrivals: list[tuple[Arrival | Cancellation, Sequence | None]] = []
        self._arrivals_lock = threading.Lock()
        self._stop_shared = False  # the leader has sent its stop step
        self.busy_since: float | None = None  # when the step in progress started (None: between steps)
        self.dead: str | None = None  # why the engine stopped for good (a rank died, hung or diverged)
        self.on_dead: Callable[[str], None] = lambda reason: None

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    @property
    def num_running(self) -> int:
        return self.snapshot.num_running

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def make_parameters(self, prompt_length: int | None = None, **overrides: object) -> GenerationParameters:
        return self.submission.parameters(prompt_length, **overrides)

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParameters,
        options: RequestOptions = RequestOptions(),
        grammar: object | None = None,
    ) -> Sequence:
        """Queue a request. `grammar` is its own matcher from `self.grammars` when its output is constrained."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        waiting = self.scheduler.waiting
        queue = QueueState(len(waiting), waiting.num_tokens, self.snapshot.free_rows)
        seq = self.submission.sequence(prompt_ids, params, options, grammar, self.estimator, queue)
        if self.lockstep is None:
            self.scheduler.add(seq)
        else:
            options = dataclasses.replace(seq.options, request_id=seq.request_id)
            self._arrive(Arrival(seq.request_id, tuple(prompt_ids), params, options, seq.arrival_time), seq)
        self._wakeup.set()
        return seq

    def _read_adapter(self, name: str, path: Path) -> LoraAdapter:
        """The adapter in `path`, read by PEFT into host memory and checked against the served model."""
        model, lora = self.runner.model, self.runner.lora
        dtype = model.get_input_embeddings().weight.dtype
        started = time.monotonic()
        adapter = read_adapter(name, path, model, lora.targets, self.config.max_lora_rank, dtype, torch.device("cpu"))
        seconds = time.monotonic() - started
        self.adapter_loads.append((name, seconds))
        self.on_adapter_loaded(name, seconds)
        log.info("LoRA adapter %s loaded from %s in %.3f s (rank %d)", name, path, seconds, adapter.rank)
        return adapter

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        if self.lockstep is None:
            self.scheduler.cancel(request_id, reason)
        else:
            self._arrive(Cancellation(request_id, reason), None)
        self._wakeup.set()

    def _arrive(self, arrival: Arrival | Cancellation, seq: Sequence | None) -> None:
        with self._arrivals_lock:
            self._arrivals.append((arrival, seq))

    def _share_inputs(self, started: float, deadline_margin: float) -> StepInputs:
        """Tensor parallelism: the step's inputs, from the leader to every rank, applied to this rank's scheduler
        (the leader adds the sequences it built; a follower rebuilds them)."""
        leader_sequences: dict[int, Sequence] = {}
        inputs = None
        if self.lockstep.leads:
            with self._arrivals_lock:
                taken, self._arrivals = self._arrivals, []
            leader_sequences = {id(arrival): seq for arrival, seq in taken if seq is not None}
            self._stop_shared = self._stopping.is_set()
            inputs = StepInputs(tuple(arrival for arrival, _ in taken), started, deadline_margin, self._stop_shared)
        inputs = self.lockstep.share(inputs)
        for arrival in inputs.arrivals:
            if isinstance(arrival, Cancellation):
                self.scheduler.cancel(arrival.request_id, arrival.reason)
                continue
            seq = leader_sequences.get(id(arrival))
            if seq is None:
                constraint = arrival.options.constraint
                grammar = self.grammars.matcher(constraint) if constraint is not None else None
                seq = self.submission.build(
                    arrival.request_id,
                    list(arrival.prompt_ids),
                    arrival.params,
                    arrival.options,
                    grammar,
                    arrival.arrival_time,
                )
            self.scheduler.add(seq)
        return inputs

    def describe(self) -> ModelDescription:
        blocks = self.scheduler.blocks
        return ModelDescription(
            model_name=self.loaded.name,
            vocab_size=self.vocab_size,
            config=self.config,
            kv_cache_tokens=blocks.capacity_tokens if blocks is not None else 0,
            kv_block_size=blocks.block_size if blocks is not None else 0,
            assistant_model=self.assistant_name,
            architecture=self.loaded.architecture,
            attn_implementation=self.loaded.attn_implementation,
        )

    def load_report(self) -> LoadReport:
        snapshot, num_waiting = self.snapshot, self.num_waiting
        return LoadReport(
            queue_size=num_waiting,
            running_requests=snapshot.num_running,
            max_running=self.config.max_running,
            kv_cache_usage_ratio=snapshot.kv_cache_usage_ratio,
            tokens_in_flight=snapshot.tokens_held,
            retry_delay_seconds=self.estimator.retry_delay(num_waiting),
        )

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
        try:
            while not self._stopping.is_set():
                if not self.step():
                    self._wakeup.wait(timeout=HEARTBEAT_SECONDS)
                    self._wakeup.clear()
            if self.lockstep is not None and not self._stop_shared and self.dead is None:
                self.step()  # the stop step: every follower leaves its loop with the leader
        except Exception as error:  # noqa: BLE001 - only a lockstep step raises: the group cannot go on
            log.exception("tensor-parallel step failed")
            # A collective fails when a rank is gone: the leader's RankWatch names which, within its interval.
            if not self._stopping.wait(LOST_RANK_GRACE_SECONDS):
                self.fail(f"tensor-parallel step failed: {type(error).__name__}: {str(error)[:200]}")

    def follow(self) -> None:
        """A follower rank's loop: the leader's steps, until the leader's stop step (a failed collective raises)."""
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self.step()

    def fail(self, reason: str) -> None:
        """End the engine for good (a rank died, hung or diverged): callers learn it through `on_dead`. Once the
        leader has sent its stop step, followers leaving is the expected end, not a failure."""
        if self.dead is not None or self._stop_shared:
            return
        log.error("engine dead: %s", reason)
        self.dead = reason
        self._stopping.set()
        self.on_dead(reason)

    def step(self) -> bool:
        """One scheduling round and one model step; False when there was nothing to compute."""
        started = time.monotonic()
        deadline_margin = self._deadline_margin()
        self.busy_since = started  # sharing the inputs counts: a hung rank may hold the leader there
        try:
            if self.lockstep is not None:
                inputs = self._share_inputs(started, deadline_margin)
                if inputs.stop:
                    self._stopping.set()
                    return False
                started, deadline_margin = inputs.started, inputs.deadline_margin
            return self._step(started, deadline_margin)
        finally:
            self.busy_since = None

    def _step(self, started: float, deadline_margin: float) -> bool:
        counters_before = self.runner.counters()  # prefix lookups are counted as the scheduler admits
        plan, events = self.scheduler.schedule(started)  # schedule
        try:
            output = self.runner.execute(plan)  # execute
        except Exception as error:
            if self.lockstep is not None:
                raise  # a rank cannot recover alone: the group ends
            self._publish(events + self._recover(plan, error))  # one bad step must not kill the engine thread
            return True
        now = time.monotonic()
        if self.lockstep is not None:
            now = self.lockstep.agree(output, now)
        stepped, ended = self.scheduler.update(plan, output, now, deadline_margin)  # update
        self.runner.release(ended)  # release
        self._publish(events + stepped)  # publish
        if plan.has_work:
            self._record(plan, output, ended, started, now, self.runner.counters() - counters_before)
        return plan.has_work

    def _record(
        self,
        plan: StepPlan,
        output: ModelOutput,
        ended: list[Sequence],
        started: float,
        now: float,
        counters: TokenCounters,
    ) -> None:
        """A computed step's figures: the load estimator's rates, and the statistics `on_step` hands on."""
        num_prefill_tokens = plan.num_batched_tokens - len(plan.decodes)
        self.num_prefilled += len(plan.admitted)
        self.estimator.record_step(now - started, num_prefill_tokens)
        self.estimator.record_finished(len(ended), now)
        self.on_step(
            StepStats(
                num_prefilled=len(plan.admitted),
                num_rows=len(output.results),
                seconds=now - started,
                queue_waits=tuple((seq.options.priority, started - seq.arrival_time) for seq in plan.admitted),
                num_preempted=len(plan.preempted) - plan.num_preempted_for_kv,
                tokens=counters,
                num_prefill_tokens=num_prefill_tokens,
                num_preempted_for_kv=plan.num_preempted_for_kv,
            )
        )

    def _recover(self, plan: StepPlan, error: Exception) -> list[TokenEvent]:
        if is_out_of_memory(error):
            to_release, events = self.scheduler.recover_from_out_of_memory(plan)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            log.exception("engine step failed; failing every request in it")
            to_release, events = self.scheduler.fail_all(plan, f"{type(error).__name__}: {error}")
        self.runner.release(to_release)
        return events

    def _deadline_margin(self) -> float:
        """Stop a partial-results request this early, so its final message reaches the client in time."""
        return 3 * (self.estimator.step_seconds or 0.0) + 0.1

    def _adapters_in_use(self) -> dict[str, tuple[str, ...]]:
        """The snapshot's running and waiting adapters (an adapter with rows is running, not waiting)."""
        scheduler = self.scheduler
        running = {seq.options.adapter for seq in (*scheduler.running, *scheduler.prefilling)} - {""}
        waiting = scheduler.waiting.adapters() - running - {""}
        return dict(running_adapters=tuple(sorted(running)), waiting_adapters=tuple(sorted(waiting)))

    def _publish(self, events: list[TokenEvent]) -> None:
        scheduler, blocks = self.scheduler, self.scheduler.blocks
        self.snapshot = EngineSnapshot(
            num_running=len(scheduler.running) + len(scheduler.prefilling),
            num_prefilling=len(scheduler.prefilling),
            num_slots=scheduler.num_slots,
            row_limit=scheduler.row_limit,
            tokens_held=self.runner.num_tokens_held(),
            kv_cache_usage_ratio=blocks.num_used / blocks.num_blocks if blocks else self.runner.kv_usage_ratio(),
            kv_blocks_free=blocks.num_free if blocks else 0,
            kv_blocks_total=blocks.num_blocks if blocks else 0,
            kv_blocks_cached=blocks.num_cached_free if blocks else 0,
            **self._adapters_in_use() if self.config.serves_adapters else {},
        )
        if events:
            self.on_events(events)
