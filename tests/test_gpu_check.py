"""The GPU check's CPU dry run (`make gpu-check` on a machine with a GPU; README: "The GPU check"): the same script
at its smallest sizes, so that it still works when a session is next lent a device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.gpu_check import CACHES, PARITY_MODELS, SMOKE_SIZES, Report, run_check

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_writes_every_section(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu_check", "--device", "cpu", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and all(check["passed"] for check in report["checks"])
    parity = [check["name"] for check in report["checks"] if check["name"].startswith("parity ")]
    # every model, in both decode modes, with every cache (slots, paged, paged with prefix caching)
    assert len(parity) == len(PARITY_MODELS) * len(SMOKE_SIZES.dtypes) * 2 * len(CACHES)
    cached = [check for check in report["checks"] if check["name"].endswith("prefix caching")]
    assert cached and all("prompt tokens from the cache" in check["detail"] for check in cached)
    assert {name.split(" float32")[0] for name in parity} == {f"parity {label}" for label in PARITY_MODELS}
    decode = report["decode_latency"]
    assert [row["batch_size"] for row in decode] == list(SMOKE_SIZES.batch_sizes) * 2
    assert all(row["step_ms"] > 0 and row["floor_ms"] > 0 for row in decode)
    systems = [row["system"] for row in report["throughput"]]
    assert systems[0] == "genserve" and len(systems) == 3 and any("generate_batch" in s for s in systems)
    assert all(row["tokens"] > 0 for row in report["throughput"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| parity Llama float32 eager paged cache | pass |" in table and "step / floor" in table


def test_a_failed_check_is_named_and_the_next_still_runs() -> None:
    report = Report(device="cpu", versions={}, deadline=float("inf"))

    def broken() -> str:
        raise AssertionError("request r2 differs from generate() at token 3")

    run_check(report, "parity broken", broken)
    run_check(report, "parity fine", lambda: "6 requests equal")
    assert report.failed == ["parity broken"]
    assert "token 3" in report.checks[0].detail and report.checks[1].passed


def test_checks_past_the_time_budget_fail_as_not_run() -> None:
    report = Report(device="cpu", versions={}, deadline=0.0)
    run_check(report, "decode step", lambda: "measured")
    assert report.failed == ["decode step"] and "not run" in report.checks[0].detail


def test_cuda_asked_without_a_gpu_fails_loudly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.gpu_check", "--device", "cuda", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "no CUDA device" in result.stderr
