"""Load the clients and load balancers can act on: ORCA trailers on every response, RetryInfo on overload.

The trailer `endpoint-load-metrics-bin` carries an `xds.data.orca.v3.OrcaLoadReport`, the format Envoy and
gRPC's weighted round robin read for backend-metric-based load balancing. gRPC's C-core clients (Python, C++,
...) consume that key for their load balancers and don't show it to the application, so the same bytes also
travel as `genserve-load-report-bin`, for applications to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from xds.data.orca.v3 import orca_load_report_pb2

from scheduler.engine import LoadReport

ORCA_TRAILER_KEY = "endpoint-load-metrics-bin"
APPLICATION_TRAILER_KEY = "genserve-load-report-bin"

Trailer = tuple[tuple[str, bytes], ...]


def orca_trailer(report: LoadReport) -> Trailer:
    rows_used = report.running_requests / report.max_running
    message = orca_load_report_pb2.OrcaLoadReport(
        application_utilization=max(rows_used, report.kv_cache_usage_ratio),
        utilization={"rows": rows_used, "kv_cache": report.kv_cache_usage_ratio},
        named_metrics={
            "queue_size": report.queue_size,
            "running_requests": report.running_requests,
            "kv_cache_usage_ratio": report.kv_cache_usage_ratio,
            "tokens_in_flight": report.tokens_in_flight,
        },
    )
    report_bytes = message.SerializeToString()
    return ((ORCA_TRAILER_KEY, report_bytes), (APPLICATION_TRAILER_KEY, report_bytes))


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
