"""A genserve server on a free local port, in a background thread, and clients that send a whole workload at
once, over gRPC or an OpenAI-compatible HTTP API: what `genserve bench --through-grpc` / `--through-http` and the
llama.cpp and vLLM comparisons measure with (the HTTP client drives vLLM's server as well as genserve's)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc


@dataclass(frozen=True)
class StreamedRun:
    seconds: float  # the first request sent to the last one answered
    token_counts: list[int]  # tokens generated per request, in order
    first_token_seconds: list[float]  # per request, from the start
    outputs: list[list[int]] | None = None  # the token ids per request (gRPC; the HTTP API returns text)

    @property
    def generated_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def mean_first_token_seconds(self) -> float:
        return sum(self.first_token_seconds) / len(self.first_token_seconds)


@contextmanager
def local_server(engine, http: bool = False) -> Iterator[str]:  # noqa: ANN001 - an Engine (no engine imports here)
    """Serve `engine` on 127.0.0.1 (a free port) until the block ends, then drain; yields the gRPC target, or with
    `http` the HTTP API's base URL."""
    from genserve.service.server import GenerationServer, ServerOptions

    server = GenerationServer(engine, ServerOptions(port=0, http_port=0 if http else None))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="local-grpc-server", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(600)
    try:
        yield f"http://127.0.0.1:{server.http_port}" if http else f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.drain(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str, log_path: Path, seconds: float = 1200) -> None:
    """Until `url` answers 200; a server process that exits first raises, pointing at its log."""
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: see {log_path}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@dataclass(frozen=True)
class ServedProcess:
    grpc_target: str  # host:port
    http_url: str  # the OpenAI API's base URL (/metrics is there too)
    pid: int


@contextmanager
def serve_process(
    serve_flags: list[str], log_path: Path, environment: dict[str, str] | None = None
) -> Iterator[ServedProcess]:
    """`genserve serve` with these flags in a process of its own (as users run it, apart from the load
    generator), on free local ports, until the block ends; yields its endpoints once health says SERVING."""
    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "genserve", "serve", *serve_flags, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--http-port", str(http_port), "--metrics-port", "0"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
    try:
        wait_healthy(process, f"http://127.0.0.1:{http_port}/health", log_path)
        yield ServedProcess(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", process.pid)
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, seconds: float = 120) -> None:
    """SIGTERM to a server started with `start_new_session` and every process it started; waits for it."""
    with suppress(ProcessLookupError):  # it exited already, and took its group with it
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=seconds)


def stream_all(target: str, requests: list[pb.GenerateRequest]) -> StreamedRun:
    """Send every request at once (one streaming call each, asking for token ids) and collect their tokens.
    One asyncio client on this thread drives every stream, as a load generator would: a thread per stream
    would compete with the server for the GIL and the cores it measures."""
    return asyncio.run(_stream_all(target, [_with_token_ids(request) for request in requests]))


async def _stream_all(target: str, requests: list[pb.GenerateRequest]) -> StreamedRun:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        started = time.perf_counter()

        async def one(request: pb.GenerateRequest) -> tuple[list[int], float]:
            tokens: list[int] = []
            first = 0.0
            async for chunk in stub.GenerateStream(request, timeout=3600):
                if chunk.token_ids and not tokens:
                    first = time.perf_counter() - started
                tokens.extend(chunk.token_ids)
            return tokens, first

        answers = await asyncio.gather(*(one(request) for request in requests))
        seconds = time.perf_counter() - started
    outputs = [tokens for tokens, _ in answers]
    return StreamedRun(seconds, list(map(len, outputs)), [first for _, first in answers], outputs)


def stream_all_http(
    url: str, prompts: list[list[int]], max_new_tokens: list[int], extra_body: dict | None = None
) -> StreamedRun:
    """The same over the OpenAI API: one streamed /v1/completions call per prompt (token ids in, greedy), all at
    once from one asyncio client; tokens counted from each stream's usage chunk (the API returns text).
    `extra_body`: more fields for every request (`model`, vLLM's `ignore_eos`)."""
    return asyncio.run(_stream_all_http(url, prompts, max_new_tokens, extra_body or {}))


async def _stream_all_http(
    url: str, prompts: list[list[int]], max_new_tokens: list[int], extra_body: dict
) -> StreamedRun:
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        started = time.perf_counter()

        async def one(prompt: list[int], limit: int) -> tuple[int, float]:
            body = {
                "prompt": prompt,
                "max_tokens": limit,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                **extra_body,
            }
            first, generated = 0.0, 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    if not first and any(choice.get("text") for choice in chunk["choices"]):
                        first = time.perf_counter() - started
                    if chunk.get("usage"):
                        generated = chunk["usage"]["completion_tokens"]
            return generated, first

        answers = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, max_new_tokens)))
        seconds = time.perf_counter() - started
    return StreamedRun(seconds, [generated for generated, _ in answers], [first for _, first in answers])


def _with_token_ids(request: pb.GenerateRequest) -> pb.GenerateRequest:
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.return_token_ids = True
    return copy
