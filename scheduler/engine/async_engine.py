"""The asyncio-facing API: `generate()` returns an async iterator of outputs; the event loop never waits on the model.

The engine thread hands each step's events over with one `call_soon_threadsafe` per step; they are routed here
to per-request queues. Detokenization and stop strings run here, per request, off the engine thread.
Leaving the iterator early (client gone, task cancelled) cancels the request, which frees its row within a step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from genserve.scheduler.core.errors import AdapterError, EngineDeadError, UnknownAdapterError
from genserve.scheduler.core.params import GenerationParameters, ValidationError
from genserve.scheduler.core.request import FinishReason, RequestOptions, TokenEvent, TokenLogprob
from genserve.scheduler.core.snapshot import EngineSnapshot, LoadReport, StepStats
from genserve.scheduler.engine.detokenizer import IncrementalDetokenizer
from genserve.scheduler.engine.loop import Engine


class RequestFailedError(RuntimeError):
    """The engine failed this request (a fault in its step); the message says why."""


@dataclass(frozen=True)
class GenerationOutput:
    request_id: str
    token_ids: tuple[int, ...]  # new tokens in this chunk
    text: str  # new text in this chunk
    num_prompt_tokens: int
    num_generated_tokens: int  # so far, this chunk included
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in this chunk, when asked


class AsyncEngine:
    """The one object the front ends hold: requests in and streams out, and everything they may read of the
    engine (parameters with the model's defaults, the model's description, load, the published snapshot)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.tokenizer: PreTrainedTokenizerBase | None = engine.loaded.tokenizer
        self.description = engine.describe()
        self._queues: dict[str, asyncio.Queue[TokenEvent]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_dead: Callable[[str], None] = lambda reason: None

    def make_parameters(self, prompt_length: int | None = None, **overrides: object) -> GenerationParameters:
        """Parameters with the model's generation defaults under `overrides`, validated (ValidationError)."""
        return self._engine.make_parameters(prompt_length, **overrides)

    def load_report(self) -> LoadReport:
        return self._engine.load_report()

    def check_adapter(self, name: str) -> None:
        """UnknownAdapterError unless the server knows a LoRA adapter `name` (registered, or under --lora-dir)."""
        if not self._engine.adapters.knows(name):
            raise UnknownAdapterError(name)

    def adapters(self) -> list[str]:
        """The LoRA adapters requests may name: registered ones, and those read from --lora-dir so far."""
        return self._engine.adapters.known()

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter at run time (read on a worker thread); AdapterError says why it cannot be served."""
        self._check_runtime_lora()
        await asyncio.to_thread(self._engine.adapters.register, name, Path(path))

    def unload_adapter(self, name: str) -> None:
        """Unload a LoRA adapter (registered, or read from --lora-dir); refused while requests use it."""
        self._check_runtime_lora()
        self._engine.adapters.unregister(name)

    def _check_runtime_lora(self) -> None:
        if not self._engine.config.runtime_lora:
            raise AdapterError("loading and unloading adapters while serving is off (--allow-runtime-lora)")

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._engine.snapshot

    def on_step(self, callback: Callable[[StepStats], None]) -> None:
        """Call `callback` on the engine thread after each step (keep it cheap: it delays the next step)."""
        self._engine.on_step = callback

    def on_adapter_loaded(self, callback: Callable[[str, float], None]) -> None:
        """Call `callback(adapter, seconds)` for each LoRA adapter loaded, those loaded already first."""
        for name, seconds in self._engine.adapter_loads:
            callback(name, seconds)
        self._engine.on_adapter_loaded = callback

    @property
    def num_streams(self) -> int:
        """Requests with a live output stream (a leak shows up here)."""
        return len(self._queues)

    def on_dead(self, callback: Callable[[str], None]) -> None:
        """Call `callback(reason)` on the event loop if the engine stops for good (a tensor-parallel rank died or
        hung), after every open stream has been ended with EngineDeadError."""
        self._on_dead = callback

    def start(self) -> None:
        """Bind to the running event loop and start the engine thread."""
        self._loop = asyncio.get_running_loop()
        self._engine.on_events = self._from_engine_thread
        self._engine.on_dead = lambda reason: self._loop.call_soon_threadsafe(self._end_streams, reason)
        self._engine.start()

    def _end_streams(self, reason: str) -> None:
        for request_id, queue in self._queues.items():
            queue.put_nowait(TokenEvent(request_id, (), None, 0, error=reason))
        self._on_dead(reason)

    def stop(self) -> None:
        self._engine.stop()

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._require_tokenizer().encode(text, add_special_tokens=add_special_tokens)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self._require_tokenizer()
        if not tokenizer.chat_template:
            raise ValidationError("messages", "this model has no chat template")
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])

    async def generate(
        self,
        prompt_ids: list[int],
        params: GenerationParameters,
        options: RequestOptions = RequestOptions(),
    ) -> AsyncIterator[GenerationOutput]:
        if options.request_id is not None and options.request_id in self._queues:
            raise ValidationError("request_id", f"request {options.request_id!r} is already running")
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        # Compiling a grammar can take a while on a cache miss: a worker thread does it, never the event loop.
        constraint = options.constraint
        grammar = await asyncio.to_thread(self._engine.grammars.matcher, constraint) if constraint else None
        adapter = options.adapter
        if adapter:  # held in memory while the request lives; read on a worker thread if it is not there
            await asyncio.to_thread(self._engine.adapters.acquire, adapter)
        try:
            seq = self._engine.submit(prompt_ids, params, options, grammar)
        except BaseException:
            if adapter:
                self._engine.adapters.release(adapter)
            raise
        self._queues[seq.request_id] = queue
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop_strings) if self.tokenizer else None
        num_generated = 0
        finished = False
        try:
            while not finished:
                event = await queue.get()
                if event.error is not None:
                    if self._engine.dead is not None:
                        raise EngineDeadError(f"the engine stopped: {self._engine.dead}; retry on another replica")
                    raise RequestFailedError(event.error)
                text, stop_string = "", None
                for token_id in event.token_ids:
                    num_generated += 1
                    if detokenizer is not None:
                        delta = detokenizer.push(token_id)
                        text += delta.text
                        stop_string = delta.stop_string
                        if stop_string is not None:
                            break  # tokens after it in this chunk (accepted speculation) are not part of the output
                finish_reason = event.finish_reason
                if stop_string is not None:
                    finish_reason = FinishReason.STOP_STRING
                    self._engine.cancel(seq.request_id, FinishReason.STOP_STRING)
                elif finish_reason is not None and detokenizer is not None:
                    text += detokenizer.flush()
                finished = finish_reason is not None
                yield GenerationOutput(
                    seq.request_id,
                    event.token_ids,
                    text,
                    event.num_prompt_tokens,
                    num_generated,
                    finish_reason,
                    stop_string,
                    event.logprobs,
                )
        finally:
            del self._queues[seq.request_id]
            if not finished:
                self._engine.cancel(seq.request_id)
            if adapter:
                self._engine.adapters.release(adapter)

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise ValidationError("text", "this model has no tokenizer; send input_ids")
        return self.tokenizer

    def _from_engine_thread(self, events: list[TokenEvent]) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._route, events)

    def _route(self, events: list[TokenEvent]) -> None:
        for event in events:
            queue = self._queues.get(event.request_id)
            if queue is not None:
                queue.put_nowait(event)
