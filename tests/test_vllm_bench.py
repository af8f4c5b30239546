"""The vLLM comparison's own parts that run without vLLM (slow to install, never in CI): genserve's side as a
`genserve serve` process started from the bench's flags, the report, and a vLLM that fails to start. The vLLM side
runs in `genserve bench --baselines vllm --vllm-python PATH` (README, "CPU against vLLM and llama.cpp"). Also
`genserve bench --serving-memory`, which measures `genserve serve` processes from outside as well."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from genserve.service.benchmarks.local_server import StreamedRun, serve_process, stream_all
from genserve.service.benchmarks.vllm_cpu import Result, format_comparison, vllm_server
from genserve.service.cli.bench import _serve_flags
from genserve.service.cli.main import build_parser
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import byte_tokenizer, tiny_model


def test_genserve_side_serves_with_the_bench_flags_and_streams_every_token(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    args = build_parser().parse_args(
        ["bench", "--model", str(tmp_path / "model"), "--kv-cache-memory", "64MiB", "--max-batch-size", "3"]
    )
    flags = _serve_flags(args, rows=3, queue=4)
    assert flags[flags.index("--max-batch-size") + 1] == "3" and flags[flags.index("--max-queue") + 1] == "5"
    parameters = pb.GenerationParameters(max_new_tokens=7, do_sample=False, ignore_eos=True)
    requests = [
        pb.GenerateRequest(input_ids=pb.TokenIds(ids=[5 + i] * (3 + i)), parameters=parameters) for i in range(4)
    ]
    with serve_process(flags, tmp_path / "serve.log") as served:
        run = stream_all(served.grpc_target, requests)
    assert run.token_counts == [7] * 4 and run.generated_tokens == 28
    assert all(0 < first <= run.seconds for first in run.first_token_seconds)


def test_report_gives_each_system_its_ratio_to_each_genserve_mode() -> None:
    ours = StreamedRun(2.0, [50, 50], [0.5, 0.7])
    compiled = StreamedRun(1.6, [50, 50], [0.4, 0.6])
    theirs = StreamedRun(4.0, [50, 50], [1.0, 1.4])
    report = format_comparison(
        [
            Result("w", "genserve (gRPC)", ours),
            Result("w", "genserve --compile (gRPC)", compiled),
            Result("w", "vLLM, default (HTTP)", theirs),
        ]
    )
    assert "| mean time to first token | genserve / system | genserve --compile / system |" in report
    assert "| w | genserve (gRPC) | 100 | 2.0 | 50.0 | 0.60 s | 1.00x | 1.25x |" in report
    assert "| w | genserve --compile (gRPC) | 100 | 1.6 | 62.5 | 0.50 s | 0.80x | 1.00x |" in report
    assert "| w | vLLM, default (HTTP) | 100 | 4.0 | 25.0 | 1.20 s | 2.00x | 2.50x |" in report


def test_report_over_rounds_gives_medians_and_the_median_of_each_rounds_ratio() -> None:
    # Per round, genserve against vLLM: 2 against 4 s (2x), 6 against 6 s on a slow host (1x), 2.5 against 3 s
    # (1.2x).
    seconds = {0: (2.0, 4.0), 1: (6.0, 6.0), 2: (2.5, 3.0)}
    results = []
    for index, (ours, theirs) in seconds.items():
        results.append(Result("w", "genserve (gRPC)", StreamedRun(ours, [100], [0.1 * (index + 1)]), index))
        results.append(Result("w", "vLLM, default (HTTP)", StreamedRun(theirs, [100], [1.0]), index))
    report = format_comparison(results)
    assert "; medians of 3 rounds" in report
    assert "| w | genserve (gRPC) | 100 | 2.5 | 40.0 | 0.20 s | 1.00x |" in report
    # The ratio is the median of the rounds' own (1.2x), not one median throughput over the other (40 / 25).
    assert "| w | vLLM, default (HTTP) | 100 | 4.0 | 25.0 | 1.00 s | 1.20x |" in report


def test_a_vllm_that_cannot_start_is_a_clear_error_pointing_at_its_log(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    with pytest.raises(RuntimeError, match="vllm.log"):
        with vllm_server(Path(sys.executable), tmp_path, 4, False, False, log):
            pass  # pragma: no cover - this python has no vllm, so the server exits at once
    assert "vllm" in log.read_text()


def test_serving_memory_reads_the_server_and_a_libraries_only_process(tmp_path: Path) -> None:
    from genserve.service.benchmarks.serving_memory import format_memory, measure

    tiny_model().save_pretrained(tmp_path / "model")
    pool = 64 * 2**20
    memory = measure(str(tmp_path / "model"), tmp_path / "model", "onednn", pool, tmp_path / "serve.log")
    assert memory.weights == (tmp_path / "model" / "model.safetensors").stat().st_size
    # The server holds the pool (every byte written) and the libraries on top of what an idle process holds.
    assert memory.rss > memory.libraries_only + pool > 100 * 2**20
    assert "| onednn |" in format_memory([memory])


def test_serving_memory_in_compiled_mode_serves_the_compiled_step(tmp_path: Path) -> None:
    from genserve.service.benchmarks.serving_memory import format_memory, libraries_only_rss, measure

    tiny_model().save_pretrained(tmp_path / "model")
    log = tmp_path / "serve.log"
    memory = measure(str(tmp_path / "model"), tmp_path / "model", "onednn", 64 * 2**20, log, compiled=True)
    assert "decode step compiled" in log.read_text()  # the server traced its decode step before serving
    assert memory.compiled and memory.rss > memory.libraries_only + memory.kv_pool
    # The process it is measured against imported and ran the compiler too, which holds memory of its own.
    assert memory.libraries_only > libraries_only_rss(compiled=False) + 8 * 2**20
    assert "| onednn, --compile |" in format_memory([memory])
