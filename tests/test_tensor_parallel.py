"""Tensor parallelism as served: `genserve serve --tensor-parallel-size 2` on this CPU (gloo), two processes, each
holding its shard of a tiny model saved as a user's folder.

Exactness: staggered greedy streams that finish at different steps equal `generate()` on the whole, unsharded
model, token for token; seeded sampling, n samples, guidance, prompt-lookup speculation and a constraint give the
same tokens as one rank. Memory: each rank holds about half the parameters. Failure: a killed rank or a hung one
(stopped with SIGSTOP) ends every open stream with UNAVAILABLE, health turns NOT_SERVING, and the server exits
non-zero with no process of its group left behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from genserve.scheduler.model.loader import load_model
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc
from tests.architectures import SERVED, save_tiny_model
from tests.conftest import byte_tokenizer
from tests.serving import ServerThread

CASES = {case.label: case for case in SERVED}
# Six requests of different lengths, joining 0.1 s apart, that finish at different steps.
STAGGERED = [([5 + i, 17, 9 + 3 * i] * (1 + i % 3), 6 + 5 * i) for i in range(6)]


@dataclass
class ServeProcess:
    """A `genserve serve` process (the leader) and what it logged."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    port: int = 0

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; the log:\n" + "".join(self.lines[-40:]))

    @property
    def follower_pid(self) -> int:
        return int(self.wait_for(r"follower ranks: pids \[(\d+)\]").group(1))

    def rank_bytes(self) -> dict[int, int]:
        found = (re.search(r"rank (\d+) of 2 holds (\d+) bytes of parameters", line) for line in self.lines)
        return {int(m.group(1)): int(m.group(2)) for m in found if m}

    def stub(self) -> generate_pb2_grpc.TextGenerationStub:
        return generate_pb2_grpc.TextGenerationStub(grpc.insecure_channel(f"127.0.0.1:{self.port}"))


def serve(folder: Path, *flags: str) -> ServeProcess:
    command = [sys.executable, "-m", "genserve.service.cli.main", "serve", "--model", str(folder)]
    command += [
        "--tensor-parallel-size",
        "2",
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--log-format",
        "text",
        *flags,
    ]
    served = ServeProcess(subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    # Read the log as it comes: a full pipe would block the server.
    threading.Thread(target=lambda: served.lines.extend(iter(served.process.stderr.readline, "")), daemon=True).start()
    served.port = int(served.wait_for(r"serving .* on port (\d+)").group(1))
    return served


@pytest.fixture
def stop_at_end():
    started: list[ServeProcess] = []
    yield started.append
    for served in started:
        for pid in (served.process.pid, *_pids_in(served)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        served.process.wait()


def _pids_in(served: ServeProcess) -> list[int]:
    try:
        return [served.follower_pid]
    except AssertionError:
        return []


def _request(prompt: list[int], max_new_tokens: int, **parameters: object) -> pb.GenerateRequest:
    extra = {key: parameters.pop(key) for key in ("num_return_sequences", "constraint") if key in parameters}
    return pb.GenerateRequest(
        input_ids=pb.TokenIds(ids=prompt),
        parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens, **parameters),
        return_token_ids=True,
        **extra,
    )


def _tokens(stub: generate_pb2_grpc.TextGenerationStub, request: pb.GenerateRequest) -> dict[int, list[int]]:
    """Each sample's tokens (by index) of one stream."""
    samples: dict[int, list[int]] = {}
    for chunk in stub.GenerateStream(request, timeout=120):
        samples.setdefault(chunk.index, []).extend(chunk.token_ids)
    return samples


def _staggered(stub: generate_pb2_grpc.TextGenerationStub, requests: list[pb.GenerateRequest]) -> list[dict]:
    """Every request on its own stream, each joining 0.1 s after the one before (mid-flight)."""

    def run(index: int) -> dict[int, list[int]]:
        time.sleep(0.1 * index)
        return _tokens(stub, requests[index])

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(run, range(len(requests))))


def _generate(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, len(prompt) :].tolist()


def _whole_model_checks(served: ServeProcess, folder: Path) -> None:
    """Staggered greedy streams equal generate() on the unsharded model; each rank holds about half of it."""
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outputs = _staggered(served.stub(), [_request(prompt, new) for prompt, new in STAGGERED])
    for (prompt, new), output in zip(STAGGERED, outputs):
        assert output[0] == _generate(whole, prompt, new)
    assert len({len(output[0]) for output in outputs}) > 1  # they did finish at different steps
    whole_bytes = sum(p.numel() * p.element_size() for p in whole.parameters())
    rank_bytes = served.rank_bytes()
    assert set(rank_bytes) == {0, 1}
    for held in rank_bytes.values():
        assert 0.45 * whole_bytes < held < 0.6 * whole_bytes, (held, whole_bytes)


def test_two_ranks_serve_llama_exactly(tmp_path: Path, stop_at_end) -> None:
    """Paged KV with prefix caching (the default) over two ranks; features against one rank."""
    folder = save_tiny_model(CASES["Llama"], tmp_path / "llama")
    byte_tokenizer().save_pretrained(folder)
    served = serve(folder, "--kv-cache-memory", "4MiB", "--max-batch-size", "12")
    stop_at_end(served)
    _whole_model_checks(served, folder)
    features = [
        _request([9, 8, 7, 6], 12, do_sample=True, temperature=0.8, top_p=0.9, seed=7),
        _request([4, 4, 5], 8, do_sample=True, seed=11, num_return_sequences=2),
        _request([30, 31, 32], 10, guidance_scale=1.5),
        _request([3, 4, 5, 6, 3, 4, 5, 6, 3, 4], 10, prompt_lookup_num_tokens=3),
        _request([70, 71], 6, constraint=pb.Constraint(regex="[a-c]{3,5}")),
    ]
    loaded = load_model(str(folder))
    one_rank = ServerThread(loaded, max_running=12, kv_cache_memory=4 * 2**20, prefix_caching=True)
    try:
        expected = _staggered(one_rank.stub, features)
    finally:
        one_rank.close()
    assert _staggered(served.stub(), features) == expected
    assert len(expected[1]) == 2 and expected[1][0] != expected[1][1]
    assert served.stub().ModelInfo(pb.ModelInfoRequest()).tensor_parallel_size == 2
    metrics_port = served.wait_for(r"metrics on port (\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
        assert "genserve_tensor_parallel_size 2.0" in response.read().decode()
    # SIGTERM drains the group: a running stream finishes, then every rank exits 0.
    follower = served.follower_pid
    if len(os.sched_getaffinity(0)) >= 2:  # each rank pinned to its own share of the cores
        leader_cores, follower_cores = os.sched_getaffinity(served.process.pid), os.sched_getaffinity(follower)
        assert leader_cores and follower_cores and not leader_cores & follower_cores
    stream = served.stub().GenerateStream(_request([1, 2, 3], 300, ignore_eos=True), timeout=120)
    first = next(stream)
    served.process.send_signal(signal.SIGTERM)
    assert len(first.token_ids) + sum(len(chunk.token_ids) for chunk in stream) == 300
    assert served.process.wait(timeout=60) == 0
    assert "rank 1 of 2 left with its leader" in "".join(served.lines)
    with pytest.raises(ProcessLookupError):
        os.kill(follower, 0)


@pytest.mark.parametrize("label", ["Qwen3", "Qwen3-MoE"])
def test_two_ranks_serve_qwen3_and_a_mixture_of_experts_exactly(label: str, tmp_path: Path, stop_at_end) -> None:
    """Qwen3 (q/k norms; its output head tied to the input embedding, as Qwen3-0.6B's is) and Qwen3-MoE (its
    experts split between the ranks) over the slot cache."""
    folder = save_tiny_model(CASES[label], tmp_path / label, tie_word_embeddings=label == "Qwen3")
    served = serve(folder, "--kv-cache-memory", "0", "--max-context", "256")
    stop_at_end(served)
    _whole_model_checks(served, folder)


def _watch_health(served: ServeProcess) -> list[int]:
    """Health statuses as the server announces them, collected on a thread."""
    statuses: list[int] = []
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{served.port}"))

    def watch() -> None:
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                statuses.append(response.status)
        except grpc.RpcError:
            pass

    threading.Thread(target=watch, daemon=True).start()
    return statuses


def _assert_group_fails_loudly(served: ServeProcess, break_rank) -> None:  # noqa: ANN001
    """Four streams decode; `break_rank(pid)` breaks the follower; every stream ends UNAVAILABLE within 20 s,
    health turns NOT_SERVING, the leader exits non-zero within 60 s and no process of the group is left."""
    follower = served.follower_pid
    statuses = _watch_health(served)
    stub = served.stub()
    streams = [stub.GenerateStream(_request([5 + i, 6, 7], 2000, ignore_eos=True), timeout=120) for i in range(4)]
    for stream in streams:
        next(stream)  # every stream is decoding
    broken = time.monotonic()
    break_rank(follower)
    for stream in streams:
        with pytest.raises(grpc.RpcError) as raised:
            for _ in stream:
                pass
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
        assert "rank" in raised.value.details()
    assert time.monotonic() - broken < 20
    assert served.process.wait(timeout=60) != 0
    assert health_pb2.HealthCheckResponse.SERVING in statuses
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(follower, 0)  # reaped: gone, not a zombie


def test_a_killed_rank_ends_every_stream_and_the_server(tmp_path: Path, stop_at_end) -> None:
    served = serve(save_tiny_model(CASES["Llama"], tmp_path / "llama"), "--kv-cache-memory", "4MiB")
    stop_at_end(served)
    _assert_group_fails_loudly(served, lambda pid: os.kill(pid, signal.SIGKILL))


def test_a_hung_rank_is_caught_by_the_step_timeout(tmp_path: Path, stop_at_end) -> None:
    served = serve(save_tiny_model(CASES["Llama"], tmp_path / "llama"), "--step-timeout", "3")
    stop_at_end(served)
    _assert_group_fails_loudly(served, lambda pid: os.kill(pid, signal.SIGSTOP))


def test_bench_serves_one_and_two_ranks_side_by_side(tmp_path: Path, capsys) -> None:
    """`genserve bench --tensor-parallel-size 2 --load-format dummy`, the report a GPU session fills with --device
    cuda: random weights cut by the plans, here with the output head tied to the embedding (as Qwen2.5-0.5B's)."""
    from genserve.service.cli.main import main

    folder = save_tiny_model(CASES["Qwen3"], tmp_path / "qwen3", tie_word_embeddings=True)
    arguments = ["bench", "--model", str(folder), "--tensor-parallel-size", "2", "--load-format", "dummy"]
    arguments += ["--parallel", "3", "--prompt-tokens", "8", "--new-tokens", "5", "--vllm-log", str(tmp_path / "log")]
    assert main(arguments) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    measured = [(row[0].strip(), row[1].strip()) for row in rows[1:]]
    assert measured == [("1", "3 x 8 tokens"), ("1", "1 x 8 tokens"), ("2", "3 x 8 tokens"), ("2", "1 x 8 tokens")]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows[1:])


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        (dict(lora_dir="adapters"), "LoRA adapters"),
        (dict(decode_mode="static"), "CUDA graphs"),
        (dict(linear_kernel="onednn"), "the oneDNN-prepacked"),
    ],
)
def test_what_the_sharded_step_does_not_run_is_refused_at_start_up(setting: dict, named: str) -> None:
    from genserve.scheduler.core.config import EngineConfig

    EngineConfig(**setting)  # served with one rank
    with pytest.raises(ValueError, match=f"tensor parallelism does not serve {named}"):
        EngineConfig(tensor_parallel_size=2, **setting)
