"""`genserve serve` as a real process: SIGTERM drains in-flight streams to completion and exits 0."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from tests.conftest import tiny_model


def _start(model_dir: Path) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "genserve.service.cli.main",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--drain-seconds",
            "60",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"serving .* on port (\d+)", line)
        if match:
            return process, int(match.group(1))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("server did not start")


def test_sigterm_drains_running_streams_then_exits_zero(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    process, port = _start(tmp_path / "tiny")
    try:
        stub = generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        parameters = pb.GenerationParameters(max_new_tokens=400, ignore_eos=True)
        streams = [
            stub.GenerateStream(
                pb.GenerateRequest(
                    input_ids=pb.TokenIds(ids=[5 + i, 6, 7]), parameters=parameters, return_token_ids=True
                )
            )
            for i in range(3)
        ]
        firsts = [next(stream) for stream in streams]
        process.send_signal(signal.SIGTERM)
        for first, stream in zip(firsts, streams):
            rest = list(stream)
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 400
            assert rest[-1].finish_reason == pb.LENGTH
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
