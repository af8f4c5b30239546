"""Deadline-aware scheduling, RetryInfo on overload and ORCA load reports, through real gRPC channels."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from xds.data.orca.v3 import orca_load_report_pb2

from genserve.scheduler.core.load_estimator import LoadEstimator
from genserve.scheduler.core.request import FinishReason, RequestOptions
from genserve.service.ops.load_report import APPLICATION_TRAILER_KEY
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import StepDriver
from tests.serving import LONG_CONTEXT, LONG_REQUEST_TOKENS, ServerThread, ids_request, wait_for

LONG = ids_request([5, 6, 7], max_new_tokens=1500, ignore_eos=True)


def test_estimator_predicts_from_queue_position_and_measured_rates() -> None:
    estimator = LoadEstimator()
    assert estimator.first_token_delay(requests_ahead=10, tokens_ahead=500, free_rows=0, own_tokens=50) == 0.0
    estimator.record_step(0.1, num_prefill_tokens=0)
    estimator.record_step(1.1, num_prefill_tokens=100)  # 1 s of prefill for 100 tokens on top of a 0.1 s step
    for t in range(5):
        estimator.record_finished(1, now=100.0 + t)  # a row frees every second
    delay = estimator.first_token_delay(requests_ahead=3, tokens_ahead=30, free_rows=1, own_tokens=10, now=104.0)
    assert delay == pytest.approx(3 / 1.25 + 0.1 + 40 * 0.01)  # 5 finishes over 4 s
    assert estimator.first_token_delay(0, 0, free_rows=2, own_tokens=10, now=104.0) == pytest.approx(0.1 + 0.1)
    assert estimator.retry_delay(num_waiting=5, now=104.0) == pytest.approx(4.0)


def test_request_that_cannot_meet_its_deadline_is_refused_at_once_and_never_prefilled(tiny, monkeypatch) -> None:
    server = ServerThread(tiny, max_running=1)
    try:
        long_call = server.stub.Generate.future(LONG)
        wait_for(lambda: server.engine.num_running == 1)
        queued = [server.stub.Generate.future(ids_request([8, 9], max_new_tokens=5)) for _ in range(2)]
        wait_for(lambda: server.engine.num_waiting == 2)
        # As measured under a slow workload: rows free up at 0.5/s, so 3 rows' wait is ~6 s.
        monkeypatch.setattr(server.engine.estimator, "release_rate", lambda now=None: 0.5)
        prefilled_before = server.engine.num_prefilled
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Generate(ids_request([10, 11], max_new_tokens=5), timeout=2.0)
        # The server's refusal (its message names the expected wait), not the client's own deadline expiring.
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "expected" in error.value.details()
        assert server.engine.num_prefilled == prefilled_before and server.engine.num_waiting == 2
        long_call.cancel()
        for call in queued:
            assert call.result(timeout=30).usage.generated_tokens >= 1
    finally:
        server.close()


def test_expired_queued_request_is_dropped_without_prefill(tiny) -> None:
    driver = StepDriver(tiny, max_running=1)
    driver.submit("busy", [5, 6, 7], max_new_tokens=50, ignore_eos=True)
    driver.engine.step()
    params = driver.engine.make_parameters(max_new_tokens=5)
    driver.engine.submit([8, 9], params, RequestOptions(request_id="late", deadline=time.monotonic() + 0.2))
    time.sleep(0.3)
    driver.engine.step()
    assert driver.finish["late"] is FinishReason.TIME_LIMIT and driver.tokens["late"] == []
    assert driver.engine.num_prefilled == 1 and driver.engine.num_waiting == 0


def test_partial_results_at_the_deadline(tiny) -> None:
    server = ServerThread(tiny, max_running=2, max_context=LONG_CONTEXT)
    try:
        request = ids_request([5, 6, 7], max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
        request.partial_on_deadline = True
        response = server.stub.Generate(request, timeout=2.0)
        assert response.finish_reason == pb.TIME_LIMIT
        assert 0 < response.usage.generated_tokens == len(response.token_ids) < LONG_REQUEST_TOKENS
        chunks = list(server.stub.GenerateStream(request, timeout=2.0))
        assert chunks[-1].finish_reason == pb.TIME_LIMIT and sum(len(c.token_ids) for c in chunks) > 0
        wait_for(lambda: server.engine.num_running == 0)
    finally:
        server.close()


def test_resource_exhausted_carries_retry_info(tiny) -> None:
    server = ServerThread(tiny, max_running=1, max_queue=1)
    try:
        long_call = server.stub.Generate.future(LONG)
        wait_for(lambda: server.engine.num_running == 1)
        queued = server.stub.Generate.future(ids_request([8, 9], max_new_tokens=3))
        wait_for(lambda: server.engine.num_waiting == 1)
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Generate(ids_request([10], max_new_tokens=3))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error.value)
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert 0.1 <= retry.retry_delay.ToNanoseconds() / 1e9 <= 60
        long_call.cancel()
        queued.result(timeout=30)
    finally:
        server.close()


def _orca(call: grpc.Call) -> orca_load_report_pb2.OrcaLoadReport:
    trailer = dict(call.trailing_metadata())[APPLICATION_TRAILER_KEY]
    return orca_load_report_pb2.OrcaLoadReport.FromString(trailer)


def _gauges(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_orca_trailer_decodes_and_matches_metrics(tiny) -> None:
    server = ServerThread(tiny, max_running=4, metrics=True)
    try:
        long_call = server.stub.GenerateStream(LONG)
        next(long_call)
        _, call = server.stub.Generate.with_call(ids_request([8, 9], max_new_tokens=4))
        report = _orca(call)
        gauges = _gauges(server.server.metrics_port)
        assert report.named_metrics["running_requests"] == gauges["genserve_running_requests"] == 1
        assert report.named_metrics["queue_size"] == gauges["genserve_queue_size"] == 0
        assert 0 < report.named_metrics["kv_cache_usage_ratio"] <= gauges["genserve_kv_cache_usage_ratio"]
        assert report.utilization["rows"] == pytest.approx(1 / 4)
        long_call.cancel()
        wait_for(lambda: server.engine.num_running == 0)
        _, call = server.stub.Generate.with_call(ids_request([8, 9], max_new_tokens=4))
        report, gauges = _orca(call), _gauges(server.server.metrics_port)
        assert report.named_metrics["running_requests"] == gauges["genserve_running_requests"] == 0
        assert report.named_metrics["kv_cache_usage_ratio"] == gauges["genserve_kv_cache_usage_ratio"] == 0
        with pytest.raises(grpc.RpcError) as error:  # errors carry the report too
            server.stub.Generate(ids_request([8], temperature=-1.0))
        assert APPLICATION_TRAILER_KEY in dict(error.value.trailing_metadata())
    finally:
        server.close()


def test_standard_orca_trailer_reaches_a_grpc_js_client(tiny) -> None:
    """grpc-js shows every trailer, so it can see the standard key that C-core clients consume for their LB."""
    import base64
    import json
    import shutil
    import subprocess
    from pathlib import Path

    interop = Path(__file__).parent / "interop"
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js is not installed on this machine")
    if not (interop / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=interop, check=True, capture_output=True)
    server = ServerThread(tiny, max_running=2)
    try:
        result = subprocess.run(
            ["node", "trailers.js", server.target], cwd=interop, capture_output=True, text=True, timeout=60
        )
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    trailers = json.loads(result.stdout)
    report = orca_load_report_pb2.OrcaLoadReport.FromString(base64.b64decode(trailers["endpoint-load-metrics-bin"]))
    assert report.named_metrics["running_requests"] == 0 and report.utilization["rows"] == 0
    assert trailers["genserve-load-report-bin"] == trailers["endpoint-load-metrics-bin"]


def test_queued_request_past_its_deadline_is_dropped_over_grpc(tiny) -> None:
    server = ServerThread(tiny, max_running=1)
    try:
        # The prefill counter moves at the end of the step that admits a request, after the row is in place.
        prefilled = server.engine.num_prefilled + 1
        long_call = server.stub.Generate.future(LONG)
        wait_for(lambda: server.engine.num_running == 1 and server.engine.num_prefilled == prefilled)
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Generate(ids_request([8, 9], max_new_tokens=5), timeout=0.3)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: server.engine.num_waiting == 0)
        assert server.engine.num_prefilled == prefilled and server.engine.num_running == 1
        long_call.cancel()
    finally:
        server.close()
