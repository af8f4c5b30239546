"""A short loadtest against a live server: its report agrees with what the server's metrics counted."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from genserve.service.cli.main import main
from tests.serving import ServerThread


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_loadtest_report_matches_server_metrics(tiny, tmp_path: Path) -> None:
    server = ServerThread(tiny, max_running=4, metrics=True)
    try:
        workload = "--num-requests 24 --rates 20,60 --prompt-mode ids --max-new-tokens 4,12".split()
        code = main(["loadtest", "--target", server.target, *workload, "--output", str(tmp_path)])
        metrics = _metrics(server.server.metrics_port)
    finally:
        server.close()
    assert code == 0
    report = json.loads((tmp_path / "loadtest.json").read_text())
    runs = report["runs"]
    assert [run["offered_rate"] for run in runs] == [20.0, 60.0]
    assert all(run["codes"] == {"OK": 24} for run in runs)
    served = metrics[
        ("genserve_requests_total", (("code", "OK"), ("finish_reason", "length"), ("method", "GenerateStream")))
    ]
    assert served == sum(run["requests"] for run in runs)
    assert metrics[("genserve_generated_tokens_total", ())] == sum(run["generated_tokens"] for run in runs)
    for run in runs:
        assert 0 < run["ttft_seconds"]["p50"] <= run["ttft_seconds"]["p99"] <= run["end_to_end_seconds"]["p99"]
    assert (tmp_path / "latency_cdf.png").stat().st_size > 10_000
    assert (tmp_path / "load_sweep.png").stat().st_size > 10_000


def test_loadtest_over_several_replicas_reports_each_ones_share(tiny, tmp_path: Path) -> None:
    replicas = [ServerThread(tiny, max_running=rows, metrics=True) for rows in (1, 8)]
    try:
        code = main(
            [
                "loadtest",
                "--target",
                ",".join(replica.target for replica in replicas),
                "--lb-policy",
                "round_robin",
                "--replica-metrics",
                ",".join(f"http://127.0.0.1:{replica.server.metrics_port}/metrics" for replica in replicas),
                "--num-requests",
                "20",
                "--arrival",
                "closed",
                "--concurrency",
                "4",
                "--prompt-mode",
                "ids",
                "--max-new-tokens",
                "4,8",
                "--output",
                str(tmp_path),
            ]
        )
    finally:
        for replica in replicas:
            replica.close()
    assert code == 0
    shares = json.loads((tmp_path / "loadtest.json").read_text())["runs"][0]["replicas"]
    assert [share["requests"] for share in shares] == [10, 10]  # round robin, request by request
    assert sum(share["share"] for share in shares) == 1


def test_loadtest_sends_long_prompts_and_compares_two_servers_on_the_same_requests(tiny, tmp_path: Path) -> None:
    chunked = ServerThread(tiny, max_running=4, max_num_batched_tokens=32, metrics=True)
    whole = ServerThread(tiny, max_running=4, max_num_batched_tokens=512, metrics=True)
    arguments = ["loadtest", "--target", chunked.target, "--compare-target", whole.target, "--num-requests", "12"]
    arguments += ["--rate", "30", "--prompt-mode", "ids", "--max-new-tokens", "6,10", "--output", str(tmp_path)]
    try:
        code = main([*arguments, "--long-prompt-fraction", "0.25", "--long-prompt-words", "200"])
        prompt_counts = [_metrics(server.server.metrics_port) for server in (chunked, whole)]
    finally:
        chunked.close()
        whole.close()
    assert code == 0
    for counts in prompt_counts:  # both servers got the same 12 requests, long prompts among them
        assert counts[("genserve_prompt_length_tokens_count", ())] == 12
        assert counts[("genserve_prompt_length_tokens_bucket", (("le", "128.0"),))] < 12
        assert (
            counts[("genserve_prompt_length_tokens_sum", ())]
            == prompt_counts[0][("genserve_prompt_length_tokens_sum", ())]
        )
    rows = json.loads((tmp_path / "loadtest.json").read_text())["target_comparison"][0]["rows"]
    for row in rows.values():
        assert row["target"] > 0 and row["compare_target"] > 0
        assert abs(row["ratio"] - row["compare_target"] / row["target"]) < 1e-9


def _guidellm_benchmark(requests: int, output_tokens: int, ttft_ms: float) -> dict:
    """The parts of a guidellm JSON report's benchmark that the agreement check reads."""
    return {
        "metrics": {
            "request_totals": {"successful": requests, "errored": 0},
            "prompt_token_count": {"successful": {"total_sum": 64.0 * requests}},
            "output_token_count": {"successful": {"total_sum": float(output_tokens)}},
            "time_to_first_token_ms": {"successful": {"total_sum": ttft_ms * requests}},
        }
    }


def test_guidellm_figures_are_checked_against_the_server_counters() -> None:
    from collections import Counter

    from genserve.service.benchmarks.guidellm_sweep import agreements

    ok = ("genserve_requests_total", (("code", "OK"), ("finish_reason", "length"), ("method", "Completions")))
    before = Counter({ok: 2.0, ("genserve_generated_tokens_total", ()): 10.0})
    after = Counter(
        {
            ok: 8.0,
            ("genserve_generated_tokens_total", ()): 202.0,
            ("genserve_prompt_tokens_total", ()): 384.0,
            ("genserve_time_to_first_token_seconds_sum", (("priority", "interactive"),)): 2.4,
            ("genserve_time_to_first_token_seconds_count", (("priority", "interactive"),)): 6.0,
        }
    )
    agreeing = agreements([_guidellm_benchmark(6, 192, 450.0)], before, after)
    assert all(check.agrees for check in agreeing), agreeing
    off = {check.figure: check for check in agreements([_guidellm_benchmark(6, 191, 900.0)], before, after)}
    assert not off["generated tokens"].agrees and off["generated tokens"].server == 192
    assert not off["mean time to first token (s)"].agrees
    assert off["successful requests"].agrees and off["prompt tokens"].agrees
