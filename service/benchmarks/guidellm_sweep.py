"""guidellm, a third-party OpenAI load tester (vLLM's project), against `genserve serve`'s HTTP API: a short sweep
of constant request rates, then a check that guidellm's figures agree with what the server's /metrics counted.

guidellm lives in an environment of its own (it pins its own torch, transformers and pydantic; `make
loadtest-guidellm` builds it) and runs as a subprocess: one `guidellm run` per rate, synthetic prompts of a fixed
token count made with the served model's own tokenizer, a fixed number of output tokens (it sends `ignore_eos`,
as it does to vLLM), streamed, through /v1/completions. Not in CI: guidellm's environment is large and slow to
build.

    python -m genserve.service.benchmarks.guidellm_sweep --guidellm .venv-guidellm/bin/guidellm
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from genserve.scheduler import model_folder
from genserve.service.benchmarks.local_server import serve_process

# The client's time to first token includes what the server's does not (HTTP, SSE framing, the client's own
# scheduling): the means agree when they differ by less than this much plus TTFT_RELATIVE_SLACK of the server's.
TTFT_ABSOLUTE_SLACK_SECONDS = 0.1
TTFT_RELATIVE_SLACK = 0.2


@dataclass(frozen=True)
class Agreement:
    figure: str
    guidellm: float
    server: float
    agrees: bool


def scrape(url: str) -> Counter[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every sample of a Prometheus endpoint, by name and labels."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return Counter(
        {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    )


def run_guidellm(
    guidellm: Path,
    url: str,
    model: str,
    tokenizer_folder: Path,
    rate: float,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
    report_path: Path,
) -> dict:
    """One `guidellm run` at a constant `rate` for `requests` requests; its JSON report's one benchmark."""
    command = [
        str(guidellm),
        "run",
        "--backend",
        f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
        "--tokenizer",
        f"kind=hf_auto,model={tokenizer_folder}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={prompt_tokens},output_tokens={output_tokens}",
        "--profile",
        f"kind=constant,rate={rate}",
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--output",
        f"kind=json,path={report_path}",
        "--disable-progress",
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"guidellm failed ({finished.returncode}):\n{finished.stdout[-3000:]}{finished.stderr}")
    (benchmark,) = json.loads(report_path.read_text())["benchmarks"]
    return benchmark


def agreements(benchmarks: list[dict], before: Counter, after: Counter) -> list[Agreement]:
    """guidellm's totals over every benchmark against the server's counters over the same span."""
    served = after - before

    def total(name: str, **labels: str) -> float:
        return sum(
            value
            for (sample, sample_labels), value in served.items()
            if sample == name and labels.items() <= dict(sample_labels).items()
        )

    def summed(metric: str) -> float:
        return sum(benchmark["metrics"][metric]["successful"]["total_sum"] for benchmark in benchmarks)

    requests = sum(benchmark["metrics"]["request_totals"]["successful"] for benchmark in benchmarks)
    errored = sum(benchmark["metrics"]["request_totals"]["errored"] for benchmark in benchmarks)
    guidellm_ttft = summed("time_to_first_token_ms") / 1000 / max(requests, 1)
    server_ttft = total("genserve_time_to_first_token_seconds_sum") / max(
        total("genserve_time_to_first_token_seconds_count"), 1
    )
    ttft_gap = guidellm_ttft - server_ttft
    ok = total("genserve_requests_total", code="OK", method="Completions")
    failed = total("genserve_requests_total") - total("genserve_requests_total", code="OK")
    pairs = [
        ("successful requests", requests, ok),
        ("failed requests", errored, failed),
        ("prompt tokens", summed("prompt_token_count"), total("genserve_prompt_tokens_total")),
        ("generated tokens", summed("output_token_count"), total("genserve_generated_tokens_total")),
    ]
    exact = [Agreement(figure, mine, theirs, mine == theirs) for figure, mine, theirs in pairs]
    slack = TTFT_ABSOLUTE_SLACK_SECONDS + TTFT_RELATIVE_SLACK * server_ttft
    ttft = Agreement("mean time to first token (s)", guidellm_ttft, server_ttft, -0.01 <= ttft_gap <= slack)
    return [*exact, ttft]


def format_report(rates: list[float], benchmarks: list[dict], checks: list[Agreement]) -> str:
    lines = [
        "guidellm's sweep of genserve's OpenAI API (/v1/completions, streamed)",
        "| offered rate | requests | output tokens/s | TTFT p50 / p95 | inter-token p50 / p95 | latency p50 / p95 |",
        "|---:|---:|---:|---|---|---|",
    ]
    for rate, benchmark in zip(rates, benchmarks):
        metrics = benchmark["metrics"]

        def p50_p95(metric: str, unit: str = "ms") -> str:
            percentiles = metrics[metric]["successful"]["percentiles"]
            return f"{percentiles['p50']:.0f} / {percentiles['p95']:.0f} {unit}"

        output_tokens = metrics["output_token_count"]["successful"]["total_sum"]
        latency = metrics["request_latency"]["successful"]["percentiles"]
        lines.append(
            f"| {rate:g} req/s | {metrics['request_totals']['successful']} | "
            f"{output_tokens / benchmark['duration']:.1f} | {p50_p95('time_to_first_token_ms')} | "
            f"{p50_p95('inter_token_latency_ms')} | {latency['p50']:.1f} / {latency['p95']:.1f} s |"
        )
    lines += ["", "| figure | guidellm | genserve /metrics | agrees |", "|---|---:|---:|---|"]
    lines += [f"| {c.figure} | {c.guidellm:g} | {c.server:g} | {'yes' if c.agrees else 'NO'} |" for c in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genserve.service.benchmarks.guidellm_sweep",
        description="Start `genserve serve`, drive its OpenAI API with guidellm at a few constant rates, print "
        "guidellm's figures and check them against the server's /metrics (exit 1 where they disagree).",
    )
    parser.add_argument("--guidellm", default=".venv-guidellm/bin/guidellm", help="the guidellm executable")
    parser.add_argument("--model", default="default", help="what `genserve serve --model` serves")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's rows")
    parser.add_argument("--rates", default="0.5,1,2", help="comma-separated requests per second, one run each")
    parser.add_argument("--requests-per-rate", type=int, default=16, help="requests guidellm sends at each rate")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per synthetic prompt")
    parser.add_argument("--output-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--output", default="bench-results/guidellm", help="folder for guidellm's JSON reports")
    args = parser.parse_args(argv)
    rates = [float(rate) for rate in args.rates.split(",")]
    folder, name = model_folder(args.model)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    flags = ["--model", args.model, "--max-batch-size", str(args.max_batch_size)]
    with serve_process(flags, output / "serve.log") as served:
        before = scrape(served.http_url)
        benchmarks = []
        for rate in rates:
            print(f"guidellm at {rate:g} req/s", file=sys.stderr)
            benchmarks.append(
                run_guidellm(
                    Path(args.guidellm),
                    served.http_url,
                    name,
                    folder,
                    rate,
                    args.requests_per_rate,
                    args.prompt_tokens,
                    args.output_tokens,
                    output / f"guidellm-{rate:g}.json",
                )
            )
        checks = agreements(benchmarks, before, scrape(served.http_url))
    print(format_report(rates, benchmarks, checks))
    return 0 if all(check.agrees for check in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
