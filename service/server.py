"""The grpc.aio server's assembly: the native service and the standard protocols over one engine, health and
reflection, interceptors (auth, errors, load reports), the metrics endpoint, warm-up and graceful drain."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from genserve.scheduler import (
    AsyncEngine,
    Engine,
    RequestOptions,
)
from genserve.service.ops.heap import release_free_heap
from genserve.service.ops.load_report import OOB_SERVICE, RequestRates, out_of_band_handler
from genserve.service.ops.metrics import Metrics
from genserve.service.ops.security import AuthInterceptor, TLSConfig
from genserve.service.proto_gen.fmaas import generation_pb2_grpc
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from genserve.service.proto_gen.inference import grpc_service_pb2_grpc
from genserve.service.protocols import kserve, tgis
from genserve.service.protocols.errors import ErrorInterceptor
from genserve.service.protocols.http_app import OpenAIFrontEnd
from genserve.service.protocols.http_server import HttpServer
from genserve.service.protocols.native import SERVICE_NAME, TextGenerationService

# Every service that generates: health, reflection, errors and ORCA reports cover them alike.
GENERATION_SERVICES = (SERVICE_NAME, kserve.SERVICE_NAME, tgis.SERVICE_NAME)
# The calls that generate: they count in the request rates that load reports carry.
GENERATION_METHODS = frozenset(
    f"/{service}/{method}"
    for service, methods in (
        (SERVICE_NAME, ("Generate", "GenerateStream")),
        (kserve.SERVICE_NAME, ("ModelInfer", "ModelStreamInfer")),
        (tgis.SERVICE_NAME, ("Generate", "GenerateStream")),
    )
    for method in methods
)

log = logging.getLogger(__name__)

DEAD_STREAMS_SECONDS = 2.0  # after the engine dies, how long open calls get to send their UNAVAILABLE


def _package_version() -> str:
    try:
        return importlib.metadata.version("genserve")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 asks for a free port
    grace_seconds: float = 30.0
    metrics_port: int | None = None  # None: no /metrics endpoint
    tls: TLSConfig | None = None
    auth_tokens: frozenset[str] | None = None  # None: no authentication
    max_message_bytes: int = 4 * 1024 * 1024
    max_requests_per_client: int | None = None  # None: no per-client limit
    stream_retention_seconds: float = 60.0  # how long a resumable stream is kept for a client to come back
    http_port: int | None = None  # the OpenAI-compatible HTTP API (None: off; 0 asks for a free port)


class GenerationServer:
    """Owns the grpc.aio server, the health status and the drain sequence."""

    def __init__(self, engine: Engine, options: ServerOptions = ServerOptions()) -> None:
        self.options = options
        self.async_engine = AsyncEngine(engine)
        self.metrics = Metrics(self.async_engine)
        self.metrics_port = options.metrics_port
        self.service = TextGenerationService(
            self.async_engine, self.metrics, options.max_requests_per_client, options.stream_retention_seconds
        )
        # The standard protocols translate into the native service: same admission, metrics, limits, deadlines.
        self.kserve = kserve.KServeService(self.service, self.async_engine.description.model_name, _package_version())
        self.tgis = tgis.TGISService(self.service)
        self.rates = RequestRates()
        self.grace_seconds = options.grace_seconds
        self.port = 0  # the bound port, known after start()
        self.http_port = 0  # the HTTP API's bound port, known after start()
        self._http: HttpServer | None = None
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = False  # warmed up and not draining: what HTTP /health reports
        self.exit_code = 0  # 1 when the engine died (a tensor-parallel rank lost): the supervisor restarts us

    def _serving(self) -> bool:
        return self._ready and not self.service.draining

    def _build(self) -> None:
        """grpc.aio objects belong to the loop they are made in, so they are made inside start()."""
        self.health = health.aio.HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ErrorInterceptor(
                self.metrics,
                self.async_engine.load_report,
                self.rates,
                GENERATION_SERVICES,
                GENERATION_METHODS,
            )
        ]
        if self.options.auth_tokens is not None:
            interceptors.insert(0, AuthInterceptor(self.options.auth_tokens))
        size = self.options.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
        )
        generate_pb2_grpc.add_TextGenerationServicer_to_server(self.service, self.server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, self.server)
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(self.tgis, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((out_of_band_handler(self.async_engine.load_report, self.rates),))
        reflection.enable_server_reflection(
            [
                *GENERATION_SERVICES,
                OOB_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            self.server,
        )
        address = f"{self.options.host}:{self.options.port}"
        if self.options.tls is not None:
            self.port = self.server.add_secure_port(address, self.options.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        self._stopped = asyncio.Event()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *GENERATION_SERVICES):
            await self.health.set(name, status)

    async def start(self) -> None:
        self.async_engine.on_dead(lambda reason: asyncio.ensure_future(self._die(reason)))
        self._build()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self.async_engine.start()
        await self._warm_up()
        release_free_heap()
        if self.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.metrics_port, self.options.host)
            log.info("metrics on port %d at /metrics", self.metrics_port)
        if self.options.http_port is not None:
            front_end = OpenAIFrontEnd(
                self.service, self.async_engine, self.metrics, self.options.auth_tokens, self._serving
            )
            self._http = HttpServer(front_end.app(), self.options.host, self.options.http_port, self.options.tls)
            self.http_port = await self._http.start()
            log.info("OpenAI-compatible HTTP API on port %d", self.http_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._ready = True
        log.info("serving %s on port %d", self.async_engine.description.model_name, self.port)

    async def _warm_up(self) -> None:
        """One tiny generation, so the first client doesn't pay one-off costs and SERVING means ready."""
        params = self.async_engine.make_parameters(max_new_tokens=2)
        async for _ in self.async_engine.generate([0], params, RequestOptions(request_id="warm-up")):
            pass

    async def drain(self) -> None:
        """Stop admission, let running requests finish within the grace period, then stop the engine."""
        if self.service.draining:
            return
        log.info("draining: no new requests; waiting up to %.0f s for running ones", self.grace_seconds)
        self.service.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_seconds
        # While requests run, new ones get UNAVAILABLE from the service (retryable, what clients and Envoy act
        # on); a call arriving just as gRPC itself stops would be CANCELLED instead.
        while self.service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(max(0.0, deadline - loop.time()))
        if self._http is not None:
            await self._http.stop()
        self.async_engine.stop()
        self._stopped.set()

    async def _die(self, reason: str) -> None:
        """The engine is dead (its streams have been told): NOT_SERVING at once, let the streams' statuses go out,
        then stop serving with exit code 1. The engine thread is left alone: it may wait on a lost rank."""
        log.error("engine dead (%s): NOT_SERVING, ending open streams and exiting", reason)
        self._ready = False
        self.exit_code = 1
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEAD_STREAMS_SECONDS
        while self.service.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.server.stop(0)
        if self._http is not None:
            await self._http.stop()
        self._stopped.set()

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))
        await self.start()
        await self._stopped.wait()
