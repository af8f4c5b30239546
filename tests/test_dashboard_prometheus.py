"""Every query of the Grafana dashboard, evaluated by a real Prometheus scraping a live genserve under traffic."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.serving import ServerThread

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "genserve-dashboard.json"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _query(port: int, expr: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return json.loads(urllib.request.urlopen(url, timeout=10).read())
    except urllib.error.HTTPError as error:  # a 400 carries Prometheus' parse error as JSON
        return json.loads(error.read())


def _traffic(server: ServerThread, stop: threading.Event) -> None:
    parameters = pb.GenerationParameters(max_new_tokens=8, ignore_eos=True)
    while not stop.is_set():
        server.stub.Generate(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5, 6, 7]), parameters=parameters))
        list(server.stub.GenerateStream(pb.GenerateRequest(input_ids=pb.TokenIds(ids=[8, 9]), parameters=parameters)))
        try:
            server.stub.Generate(
                pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5]), parameters=pb.GenerationParameters(top_p=2.0))
            )
        except grpc.RpcError:
            pass
        time.sleep(0.05)


def test_every_dashboard_query_returns_data(tiny, tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus package is not installed (make test installs it where apt works)")
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(queries) >= 10 and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])

    # With prefix caching on, so that its hit-rate query has prompt tokens to divide by.
    server = ServerThread(tiny, max_running=4, metrics=True, kv_cache_memory=2**20, prefix_caching=True)
    prometheus_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: genserve\n    static_configs: [{{targets: ['127.0.0.1:{server.server.metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(server, stop), daemon=True)
    sender.start()
    try:
        pending = {q: q.replace("$__rate_interval", "30s") for q in queries}
        answers: dict[str, dict] = {}
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            for original, expr in list(pending.items()):
                try:
                    answer = _query(prometheus_port, expr)
                except OSError:
                    continue  # Prometheus still starting
                answers[original] = answer
                assert answer["status"] == "success", f"invalid PromQL {expr}: {answer.get('error')}"
                values = [float(r["value"][1]) for r in answer["data"]["result"]]
                if values and all(v == v for v in values):  # data, and no NaN from an empty window
                    del pending[original]
        assert not pending, f"queries without data after 90 s: {list(pending)}"
    finally:
        stop.set()
        sender.join(timeout=30)
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.close()
