"""Load the clients and load balancers can act on: ORCA reports on every response and out of band, RetryInfo on
overload.

Each report is an `xds.data.orca.v3.OrcaLoadReport`, the format Envoy's client-side weighted round robin and
gRPC's `weighted_round_robin` (A58) read. Both weight a backend by `rps_fractional / (application_utilization +
eps / rps_fractional * penalty)`, so a report carries:
- `rps_fractional`: requests this replica completed per second over the last `RATE_WINDOW_SECONDS`;
- `eps`: of those, server-side failures per second (INTERNAL, UNAVAILABLE, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED; a client's bad request does not make a replica worse);
- `application_utilization`: requests in flight (running and queued, the one being answered included, so a
  one-row replica is not idle at the moment it reports) over the row capacity, divided by
  `UTILIZATION_SCALE`. Envoy truncates each weight to a whole number (at least 1), and an LLM replica completes
  well under one request per second: unscaled, every weight would be 1 and Envoy would fall back to plain round
  robin. Scaled, weights keep two digits at those rates; A58 computes in floating point, where the scale cancels;
- `cpu_utilization`: this process's CPU time over wall time and cores since the previous report;
- `utilization` and `named_metrics`: rows and KV in use, queue size, running requests, tokens in flight.

Per-call reports travel in the initial metadata (Envoy reads one report per request, the first it sees: for a
stream that lasts minutes, the one at its start) and in the trailers, under `endpoint-load-metrics-bin`. gRPC's
C-core clients consume that key for their load balancers and hide it from the application, so the same bytes
also travel as `genserve-load-report-bin`. `xds.service.orca.v3.OpenRcaService/StreamCoreMetrics` streams the
same report out of band, for `weighted_round_robin` with `enableOobLoadReport`, which then weights by fresh load
while long streams run.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from xds.data.orca.v3 import orca_load_report_pb2
from xds.service.orca.v3 import orca_pb2

from genserve.scheduler import LoadReport

ORCA_TRAILER_KEY = "endpoint-load-metrics-bin"
APPLICATION_TRAILER_KEY = "genserve-load-report-bin"
RATE_WINDOW_SECONDS = 10.0
UTILIZATION_SCALE = 100.0
SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
OOB_SERVICE = orca_pb2.DESCRIPTOR.services_by_name["OpenRcaService"].full_name
MIN_OOB_INTERVAL_SECONDS = 0.5

Trailer = tuple[tuple[str, bytes], ...]


class RequestRates:
    """Completed requests and server faults per second over a sliding window, and the process's CPU use.
    Recorded from the event loop, read from it and from the metrics thread."""

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self.window = window
        self.started = time.monotonic()
        self._completed: deque[float] = deque()
        self._faults: deque[float] = deque()
        self._lock = threading.Lock()
        self._cpu_sample = (time.monotonic(), time.process_time())
        self._cpu_utilization = 0.0

    def record(self, code: grpc.StatusCode) -> None:
        now = time.monotonic()
        with self._lock:
            self._completed.append(now)
            if code in SERVER_FAULTS:
                self._faults.append(now)

    def per_second(self) -> tuple[float, float]:
        """(requests, faults) per second over the window (or since start, in the first window)."""
        now = time.monotonic()
        with self._lock:
            for events in (self._completed, self._faults):
                while events and events[0] < now - self.window:
                    events.popleft()
            span = max(min(self.window, now - self.started), 1.0)
            return len(self._completed) / span, len(self._faults) / span

    def cpu_utilization(self) -> float:
        now, cpu = time.monotonic(), time.process_time()
        with self._lock:
            wall_then, cpu_then = self._cpu_sample
            if now - wall_then >= 0.5:  # shorter intervals are noise
                self._cpu_utilization = (cpu - cpu_then) / (now - wall_then) / (os.cpu_count() or 1)
                self._cpu_sample = (now, cpu)
            return min(self._cpu_utilization, 1.0)


def orca_report(report: LoadReport, rates: RequestRates, answering: int) -> orca_load_report_pb2.OrcaLoadReport:
    """The report of this moment; `answering` counts requests being answered that the engine no longer holds."""
    rows_used = report.running_requests / report.max_running
    in_flight = report.running_requests + report.queue_size + answering
    rps, eps = rates.per_second()
    return orca_load_report_pb2.OrcaLoadReport(
        rps_fractional=rps,
        eps=eps,
        application_utilization=in_flight / report.max_running / UTILIZATION_SCALE,
        cpu_utilization=rates.cpu_utilization(),
        utilization={"rows": rows_used, "kv_cache": report.kv_cache_usage_ratio},
        named_metrics={
            "queue_size": report.queue_size,
            "running_requests": report.running_requests,
            "kv_cache_usage_ratio": report.kv_cache_usage_ratio,
            "tokens_in_flight": report.tokens_in_flight,
        },
    )


def orca_trailer(report: LoadReport, rates: RequestRates, answering: int = 1) -> Trailer:
    report_bytes = orca_report(report, rates, answering).SerializeToString()
    return ((ORCA_TRAILER_KEY, report_bytes), (APPLICATION_TRAILER_KEY, report_bytes))


def out_of_band_handler(load: Callable[[], LoadReport], rates: RequestRates) -> grpc.GenericRpcHandler:
    """`OpenRcaService/StreamCoreMetrics`: the report every `report_interval` (at least 0.5 s), until the
    client leaves. xds-protos ships the messages but no service stubs, hence the generic handler."""

    async def stream_core_metrics(
        request: orca_pb2.OrcaLoadReportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[orca_load_report_pb2.OrcaLoadReport]:
        interval = max(request.report_interval.ToTimedelta().total_seconds(), MIN_OOB_INTERVAL_SECONDS)
        while True:
            yield orca_report(load(), rates, answering=0)
            await asyncio.sleep(interval)

    handler = grpc.unary_stream_rpc_method_handler(
        stream_core_metrics,
        request_deserializer=orca_pb2.OrcaLoadReportRequest.FromString,
        response_serializer=orca_load_report_pb2.OrcaLoadReport.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(OOB_SERVICE, {"StreamCoreMetrics": handler})


@dataclass(frozen=True)
class _RichStatus(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


def retry_status(code: grpc.StatusCode, message: str, delay_seconds: float, trailer: Trailer) -> grpc.Status:
    """A status whose details carry google.rpc.RetryInfo: when to try again, from the queue's drain rate."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(delay_seconds * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=[detail]))
    return _RichStatus(status.code, status.details, tuple(status.trailing_metadata) + trailer)
