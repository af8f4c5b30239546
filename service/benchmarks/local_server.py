"""A genserve server on a free local port, in a background thread, and clients that send a whole workload at
once, over gRPC or the OpenAI-compatible HTTP API: what `genserve bench --through-grpc` / `--through-http` and the
llama.cpp comparison measure genserve with."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import httpx

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc


@dataclass(frozen=True)
class GrpcRun:
    seconds: float  # the first request sent to the last one answered
    outputs: list[list[int]]  # per request, in order
    first_token_seconds: list[float]  # per request, from the start


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


def stream_all(target: str, requests: list[pb.GenerateRequest]) -> GrpcRun:
    """Send every request at once (one streaming call each, asking for token ids) and collect their tokens.
    One asyncio client on this thread drives every stream, as a load generator would: a thread per stream
    would compete with the server for the GIL and the cores it measures."""
    return asyncio.run(_stream_all(target, [_with_token_ids(request) for request in requests]))


async def _stream_all(target: str, requests: list[pb.GenerateRequest]) -> GrpcRun:
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
    return GrpcRun(seconds, [tokens for tokens, _ in answers], [first for _, first in answers])


def stream_all_http(url: str, prompts: list[list[int]], max_new_tokens: list[int]) -> GrpcRun:
    """The same over the OpenAI API: one streamed /v1/completions call per prompt (token ids in, greedy), all at
    once from one asyncio client; tokens counted from each stream's usage chunk (the API returns text)."""
    return asyncio.run(_stream_all_http(url, prompts, max_new_tokens))


async def _stream_all_http(url: str, prompts: list[list[int]], max_new_tokens: list[int]) -> GrpcRun:
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
    return GrpcRun(seconds, [[0] * generated for generated, _ in answers], [first for _, first in answers])


def _with_token_ids(request: pb.GenerateRequest) -> pb.GenerateRequest:
    copy = pb.GenerateRequest()
    copy.CopyFrom(request)
    copy.return_token_ids = True
    return copy
