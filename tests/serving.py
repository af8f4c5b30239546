"""A real genserve gRPC server on a free local port, run in a background thread for tests that use real channels."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable

import grpc
from prometheus_client.parser import text_string_to_metric_families

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import FinishReason, TokenEvent
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.features.plugins import PluginRegistry
from genserve.scheduler.model.loader import LoadedModel
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from genserve.service.server import GenerationServer, ServerOptions


class ServerThread:
    def __init__(
        self,
        loaded: LoadedModel,
        grace_seconds: float = 10.0,
        metrics: bool = False,
        options: ServerOptions | None = None,
        plugins: PluginRegistry | None = None,
        assistant: LoadedModel | None = None,
        http: bool = False,
        **config: object,
    ) -> None:
        """`http`: serve the OpenAI-compatible API too, at `http_url`."""
        self.engine = Engine(loaded, EngineConfig(**config), plugins=plugins or PluginRegistry(), assistant=assistant)
        options = options or ServerOptions(
            port=0, grace_seconds=grace_seconds, metrics_port=0 if metrics else None, http_port=0 if http else None
        )
        self.server = GenerationServer(self.engine, options)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-grpc-loop", daemon=True)
        self._thread.start()
        self.call(self.server.start())
        self._record_engine_events()
        self.target = f"127.0.0.1:{self.server.port}"
        self.http_url = f"http://127.0.0.1:{self.server.http_port}"
        # A TLS server's tests build their own secure channels.
        self.channel = grpc.insecure_channel(self.target) if options.tls is None else None
        self.stub = generate_pb2_grpc.TextGenerationStub(self.channel) if self.channel is not None else None

    def _record_engine_events(self) -> None:
        """What the engine itself emitted per request (tokens, finish reason), read on its way to the server: a
        test sees how a request really ended, not only what its client was told."""
        self.engine_tokens: Counter[str] = Counter()
        self.engine_finishes: dict[str, FinishReason] = {}
        forward = self.engine.on_events

        def record(events: list[TokenEvent]) -> None:
            for event in events:
                self.engine_tokens[event.request_id] += len(event.token_ids)
                if event.finish_reason is not None:
                    self.engine_finishes[event.request_id] = event.finish_reason
            forward(events)

        self.engine.on_events = record

    def call(self, coroutine, timeout: float = 120.0):  # noqa: ANN001, ANN201 - any coroutine, its result
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def drain_in_background(self):  # noqa: ANN201 - a concurrent.futures.Future
        return asyncio.run_coroutine_threadsafe(self.server.drain(), self.loop)

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.call(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


# Servers for lifecycle tests take requests this long: no machine generates them within a test's window (tens of
# thousands of steps), so a request that ends early was ended by the behaviour under test.
LONG_CONTEXT = 65536
LONG_REQUEST_TOKENS = 60000


def ids_request(prompt: list[int], request_id: str = "", **parameters: object) -> pb.GenerateRequest:
    """A GenerateRequest on token ids (the tiny test model has no tokenizer), returning token ids."""
    bad_words = parameters.pop("bad_words_ids", [])
    message = pb.GenerationParameters(**parameters)
    message.bad_words_ids.extend(pb.TokenIds(ids=words) for words in bad_words)
    return pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=prompt), parameters=message, return_token_ids=True, request_id=request_id
    )


def scrape(server: ServerThread) -> dict[str, float]:
    """The server's /metrics, parsed: sample name (labels left out) -> value, for unlabelled samples."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until `predicate` holds; fail the test if it doesn't within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
    return True
