"""Errors are part of the interface: every failure becomes a clear gRPC status, never a crash or UNKNOWN.

One interceptor wraps every generation method (genserve.v1, KServe v2 / Triton, TGIS): it maps the engine's
exceptions to status codes, turns undecodable request bytes into INVALID_ARGUMENT, counts errors in the metrics,
and ends every call, failed or not, with the engine's load in the ORCA trailers (RESOURCE_EXHAUSTED adds a
RetryInfo).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from genserve.scheduler import (
    AdapterError,
    DeadlineUnreachableError,
    EngineDeadError,
    LoadReport,
    QueueFullError,
    RequestFailedError,
    UnknownAdapterError,
    ValidationError,
)
from genserve.service.ops.load_report import RequestRates, Trailer, orca_trailer, retry_status
from genserve.service.ops.metrics import Metrics
from genserve.service.protocols.stream_store import StreamNotFoundError

log = logging.getLogger(__name__)


class DrainingError(RuntimeError):
    """The server is shutting down and takes no new requests; maps to UNAVAILABLE."""


class ModelNotFoundError(LookupError):
    """A request names a model this server does not serve; maps to NOT_FOUND."""


_STATUS_FOR_ERROR: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DrainingError, grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (RequestFailedError, grpc.StatusCode.INTERNAL),
    (DeadlineUnreachableError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (StreamNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (UnknownAdapterError, grpc.StatusCode.NOT_FOUND),
    (AdapterError, grpc.StatusCode.FAILED_PRECONDITION),
]


def _known_status(error: Exception) -> grpc.StatusCode | None:
    """The status of an error the engine or service raises on purpose; None for anything unexpected."""
    return next((code for error_type, code in _STATUS_FOR_ERROR if isinstance(error, error_type)), None)


def status_for(error: Exception) -> grpc.StatusCode:
    return _known_status(error) or grpc.StatusCode.INTERNAL


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, load: LoadReport, trailer: Trailer) -> None:
    code = _known_status(error)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        await context.abort_with_status(retry_status(code, str(error), load.retry_delay_seconds, trailer))
    if code is not None:
        await context.abort(code, str(error), trailing_metadata=trailer)
    log.exception("unexpected error in a request", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}", trailing_metadata=trailer)


@dataclass(frozen=True)
class _Undecodable:
    """A request whose bytes don't parse (bad UTF-8 in a string, truncated data): INVALID_ARGUMENT, not INTERNAL."""

    reason: str


def _tolerant(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - any parse failure is the client's malformed message
            return _Undecodable(str(error) or type(error).__name__)

    return parse


def _check_decoded(request: object) -> None:
    if isinstance(request, _Undecodable):
        raise ValidationError("request", f"the message does not parse: {request.reason}")


async def _checked(requests: AsyncIterator[object]) -> AsyncIterator[object]:
    """A client stream whose messages must each parse."""
    async for request in requests:
        _check_decoded(request)
        yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps the engine's exceptions to gRPC status codes for every method, unary and streaming alike, and ends
    every call with the engine's load in an ORCA trailer. Generation calls also get the report in their initial
    metadata and count in the request rates the reports carry."""

    def __init__(
        self,
        metrics: Metrics,
        load: Callable[[], LoadReport],
        rates: RequestRates,
        service_names: tuple[str, ...],
        generation_methods: frozenset[str],
    ) -> None:
        self.metrics = metrics
        self.load = load
        self.rates = rates
        self.service_prefixes = tuple(f"/{name}/" for name in service_names)
        self.generation_methods = generation_methods

    def _report(self) -> Trailer:
        return orca_trailer(self.load(), self.rates)

    async def _begin(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if method in self.generation_methods:
            await context.send_initial_metadata(self._report())

    def _end(self, method: str, code: grpc.StatusCode, context: grpc.aio.ServicerContext) -> None:
        if method in self.generation_methods:
            self.rates.record(code)
        if code == grpc.StatusCode.OK:
            context.set_trailing_metadata(self._report())

    async def _fail(self, method: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
        code = status_for(error)
        self.metrics.requests.labels(method=method.rsplit("/", 1)[-1], finish_reason="", code=code.name).inc()
        self._end(method, code, context)
        await _abort_for(error, context, self.load(), self._report())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.service_prefixes):
            return handler
        kwargs = dict(
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request, context):  # noqa: ANN001, ANN202 - grpc's handler signature
                try:
                    _check_decoded(request)
                    await self._begin(details.method, context)
                    response = await inner_unary(request, context)
                    self._end(details.method, grpc.StatusCode.OK, context)
                    return response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
                    await self._fail(details.method, error, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def checked_stream(request, context):  # noqa: ANN001, ANN202 - grpc's handler signature
                _check_decoded(request)
                async for response in inner_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(self._guarded(details.method, checked_stream), **kwargs)
        if handler.stream_stream is not None:
            inner_bidi = handler.stream_stream
            bidi = lambda requests, context: inner_bidi(_checked(requests), context)  # noqa: E731
            return grpc.stream_stream_rpc_method_handler(self._guarded(details.method, bidi), **kwargs)
        return handler

    def _guarded(self, method: str, inner: Callable) -> Callable:
        """A streaming handler whose failures become statuses and whose end carries the ORCA trailer."""

        async def guarded(request, context):  # noqa: ANN001, ANN202
            try:
                await self._begin(method, context)
                async for response in inner(request, context):
                    yield response
                self._end(method, grpc.StatusCode.OK, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - every error becomes a status, never a crash
                await self._fail(method, error, context)

        return guarded
