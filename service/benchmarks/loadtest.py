"""`genserve loadtest`: a seeded workload against a running server, with latency percentiles, goodput and plots.

Arrivals are Poisson at a rate, a burst (everything at once), or a closed loop of N concurrent clients. Every
request streams, so time to first token and inter-token latency are measured as a client sees them. Several
targets are balanced by the client's gRPC load-balancing policy (round robin, or weighted round robin on the
replicas' ORCA reports); with the replicas' /metrics endpoints given, the report says which share of the requests
each replica served, also when the load goes through a proxy such as Envoy.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.proto_gen.genserve.v1 import generate_pb2_grpc

_WORDS = (
    "the river city market morning light engine garden winter music window letter answer question simple "
    "careful bright quiet story number mountain paper travel people history science ocean forest evening"
).split()


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 100
    arrival: str = "poisson"  # poisson | burst | closed
    rate: float = 4.0  # requests/s, for poisson
    concurrency: int = 8  # clients, for closed
    prompt_words: tuple[int, int] = (8, 64)
    max_new_tokens: tuple[int, int] = (16, 128)
    prompt_mode: str = "text"  # text | ids (random token ids, for models without a tokenizer)
    batch_fraction: float = 0.0  # share of requests sent with priority BATCH, the rest INTERACTIVE
    ignore_priorities: bool = False  # send every request as INTERACTIVE (the same workload, priorities off)
    jsonl: str | None = None  # {"prompt": ..., "max_new_tokens": ...} per line, instead of synthetic prompts
    seed: int = 0
    long_prompt_fraction: float = 0.0  # share of synthetic prompts of `long_prompt_words` words instead
    long_prompt_words: int = 1200


@dataclass
class RequestRecord:
    sent: float
    priority: str = "interactive"
    code: str = "OK"
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    done: float | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class SLO:
    ttft_seconds: float = 2.0
    itl_seconds: float = 0.5


def build_requests(spec: WorkloadSpec, vocab_size: int) -> list[tuple[pb.GenerateRequest, str]]:
    """The requests, each with the class it belongs to (interactive or batch) for the report."""
    rng = random.Random(spec.seed)
    if spec.jsonl:
        lines = [json.loads(line) for line in Path(spec.jsonl).read_text().splitlines() if line.strip()]
        items = [
            (lines[i % len(lines)]["prompt"], lines[i % len(lines)].get("max_new_tokens", 64))
            for i in range(spec.num_requests)
        ]
    else:
        items = [(_synthetic_prompt(spec, rng), rng.randint(*spec.max_new_tokens)) for _ in range(spec.num_requests)]
    requests = []
    for prompt, budget in items:
        # ignore_eos makes the offered load exactly what the spec says, whatever the model answers.
        parameters = pb.GenerationParameters(max_new_tokens=budget, ignore_eos=True)
        request = pb.GenerateRequest(parameters=parameters, return_token_ids=True)
        if spec.prompt_mode == "ids":
            request.input_ids.ids.extend(rng.randrange(vocab_size) for _ in range(max(1, len(prompt.split()))))
        else:
            request.text = prompt
        # Drawn even when ignored, so both runs of a comparison see the same requests.
        is_batch = rng.random() < spec.batch_fraction
        request.priority = pb.BATCH if is_batch and not spec.ignore_priorities else pb.INTERACTIVE
        requests.append((request, "batch" if is_batch else "interactive"))
    return requests


def _synthetic_prompt(spec: WorkloadSpec, rng: random.Random) -> str:
    # Drawn only when long prompts are asked for, so that workloads without them stay as they were.
    is_long = spec.long_prompt_fraction > 0 and rng.random() < spec.long_prompt_fraction
    length = spec.long_prompt_words if is_long else rng.randint(*spec.prompt_words)
    return " ".join(rng.choice(_WORDS) for _ in range(length))


async def _send(stub: generate_pb2_grpc.TextGenerationStub, request: pb.GenerateRequest, record: RequestRecord) -> None:
    try:
        async for chunk in stub.GenerateStream(request):
            now = time.perf_counter()
            if chunk.token_ids:
                record.first_token = record.first_token or now
                record.token_times.append(now)
                record.num_tokens += len(chunk.token_ids)
    except grpc.aio.AioRpcError as error:
        record.code = error.code().name
    record.done = time.perf_counter()


def channel_target(targets: str, lb_policy: str) -> tuple[str, list[tuple[str, str]]]:
    """A gRPC target and channel options: one address as it is, several (comma-separated host:port) balanced by
    `lb_policy` (round_robin, weighted_round_robin or pick_first)."""
    addresses = [address.strip() for address in targets.split(",") if address.strip()]
    if len(addresses) == 1:
        return addresses[0], []
    policy: dict = {lb_policy: {}}
    if lb_policy == "weighted_round_robin":
        policy = {lb_policy: {"blackoutPeriod": "1s", "weightUpdatePeriod": "0.5s"}}
    config = json.dumps({"loadBalancingConfig": [policy]})
    return "ipv4:" + ",".join(addresses), [("grpc.service_config", config)]


def completed_requests(metrics_url: str) -> float:
    """How many generation calls a replica has answered, from its /metrics (genserve_requests_total)."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "genserve_requests_total"
    )


def replica_shares(metrics_urls: list[str], before: list[float], after: list[float]) -> list[dict]:
    served = [end - start for start, end in zip(before, after)]
    total = sum(served) or 1
    return [
        {"replica": url, "requests": int(count), "share": round(count / total, 3)}
        for url, count in zip(metrics_urls, served)
    ]


async def run_load(
    target: str, spec: WorkloadSpec, progress: bool = True, lb_policy: str = "round_robin"
) -> tuple[list[RequestRecord], float]:
    address, options = channel_target(target, lb_policy)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = generate_pb2_grpc.TextGenerationStub(channel)
        info = await stub.ModelInfo(pb.ModelInfoRequest())
        requests = build_requests(spec, info.vocab_size)
        rng = random.Random(spec.seed + 1)
        records: list[RequestRecord] = []
        bar = tqdm(total=len(requests), desc=f"loadtest {spec.arrival}", unit="req", disable=not progress)
        started = time.perf_counter()

        async def one(item: tuple[pb.GenerateRequest, str]) -> None:
            request, kind = item
            record = RequestRecord(sent=time.perf_counter(), priority=kind)
            records.append(record)
            await _send(stub, request, record)
            bar.update(1)

        if spec.arrival == "closed":
            queue = list(requests)

            async def client() -> None:
                while queue:
                    await one(queue.pop())

            await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        else:
            tasks = []
            for request in requests:
                tasks.append(asyncio.create_task(one(request)))
                if spec.arrival == "poisson":
                    await asyncio.sleep(rng.expovariate(spec.rate))
            await asyncio.gather(*tasks)
        bar.close()
        return records, time.perf_counter() - started


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


def summarize(records: list[RequestRecord], seconds: float, slo: SLO) -> dict:
    ok = [r for r in records if r.code == "OK"]
    ttft = [r.first_token - r.sent for r in ok if r.first_token is not None]
    gaps_by_request = [[b - a for a, b in zip(r.token_times, r.token_times[1:])] for r in ok]
    itl = [gap for gaps in gaps_by_request for gap in gaps]
    e2e = [r.done - r.sent for r in ok]
    meets_slo = [
        r
        for r, gaps in zip(ok, gaps_by_request)
        if r.first_token is not None
        and r.first_token - r.sent <= slo.ttft_seconds
        and (not gaps or sorted(gaps)[len(gaps) // 2] <= slo.itl_seconds)
    ]
    tokens = sum(r.num_tokens for r in records)
    by_priority = {
        kind: _percentiles([r.first_token - r.sent for r in ok if r.priority == kind and r.first_token is not None])
        for kind in sorted({r.priority for r in records})
    }
    return {
        "requests": len(records),
        "seconds": seconds,
        "codes": dict(Counter(r.code for r in records)),
        "generated_tokens": tokens,
        "throughput_tokens_per_s": tokens / seconds,
        "throughput_requests_per_s": len(ok) / seconds,
        "ttft_seconds": _percentiles(ttft),
        "ttft_seconds_by_priority": by_priority,
        "inter_token_latency_seconds": _percentiles(itl),
        "end_to_end_seconds": _percentiles(e2e),
        "slo": asdict(slo),
        "goodput_requests_per_s": len(meets_slo) / seconds,
        "slo_attainment": len(meets_slo) / len(records) if records else 0.0,
        "raw": {"ttft": ttft, "itl": itl, "e2e": e2e},
    }


def plot(reports: list[tuple[float | None, dict]], output_dir: Path) -> list[Path]:
    """Latency CDFs per run; with several offered rates, throughput and TTFT against the offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for rate, report in reports:
        label = f"{rate:g} req/s" if rate is not None else "run"
        for axis, key, title in zip(
            axes, ("ttft", "itl", "e2e"), ("time to first token", "inter-token latency", "end to end")
        ):
            values = sorted(report["raw"][key])
            if values:
                axis.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=label)
            axis.set_title(title)
            axis.set_xlabel("seconds")
            axis.set_ylabel("fraction of requests" if key != "itl" else "fraction of token gaps")
            axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    written.append(output_dir / "latency_cdf.png")
    figure.savefig(written[-1], dpi=110)
    plt.close(figure)
    if len(reports) > 1 and all(rate is not None for rate, _ in reports):
        rates = [rate for rate, _ in reports]
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.plot(rates, [r["throughput_tokens_per_s"] for _, r in reports], marker="o")
        left.set_title("throughput vs offered load")
        left.set_xlabel("offered load (req/s)")
        left.set_ylabel("generated tokens/s")
        for quantile in ("p50", "p90", "p99"):
            right.plot(rates, [r["ttft_seconds"][quantile] for _, r in reports], marker="o", label=quantile)
        right.set_title("time to first token vs offered load")
        right.set_xlabel("offered load (req/s)")
        right.set_ylabel("seconds")
        right.legend()
        for axis in (left, right):
            axis.grid(alpha=0.3)
        figure.tight_layout()
        written.append(output_dir / "load_sweep.png")
        figure.savefig(written[-1], dpi=110)
        plt.close(figure)
    return written


def format_summary(report: dict) -> str:
    def row(name: str, values: dict) -> str:
        cells = " | ".join("-" if v is None else f"{v * 1000:.0f} ms" for v in values.values())
        return f"| {name} | {cells} |"

    return "\n".join(
        [
            f"{report['requests']} requests in {report['seconds']:.1f} s, codes {report['codes']}",
            f"throughput: {report['throughput_tokens_per_s']:.1f} tokens/s, "
            f"{report['throughput_requests_per_s']:.2f} req/s; "
            f"goodput {report['goodput_requests_per_s']:.2f} req/s ({report['slo_attainment']:.0%} within "
            f"TTFT <= {report['slo']['ttft_seconds']} s and median ITL <= {report['slo']['itl_seconds']} s)",
            "| latency | p50 | p90 | p99 |",
            "|---|---:|---:|---:|",
            row("time to first token", report["ttft_seconds"]),
            row("inter-token latency", report["inter_token_latency_seconds"]),
            row("end to end", report["end_to_end_seconds"]),
        ]
    )


def target_comparison(ours: dict, theirs: dict) -> dict:
    """The same run against two servers: each latency percentile and the throughput, and theirs / ours."""
    rows = {}
    for name, key in (("inter-token", "inter_token_latency_seconds"), ("time to first token", "ttft_seconds")):
        for q in ("p50", "p99"):
            a, b = ours[key][q], theirs[key][q]
            rows[f"{name} {q}"] = {"target": a, "compare_target": b, "ratio": b / a if a and b is not None else None}
    a, b = max(ours["raw"]["itl"], default=None), max(theirs["raw"]["itl"], default=None)
    rows["inter-token max"] = {"target": a, "compare_target": b, "ratio": b / a if a and b is not None else None}
    a, b = ours["throughput_tokens_per_s"], theirs["throughput_tokens_per_s"]
    rows["throughput (tokens/s)"] = {"target": a, "compare_target": b, "ratio": b / a if a else None}
    return rows


def format_target_comparison(comparison: dict, names: tuple[str, str]) -> str:
    lines = [f"| | {names[0]} | {names[1]} | {names[1]} / {names[0]} |", "|---|---:|---:|---:|"]
    for name, row in comparison.items():
        scale, unit = (1, "") if name.startswith("throughput") else (1000, " ms")
        cells = [f"{row[k] * scale:.0f}{unit}" if row[k] is not None else "-" for k in ("target", "compare_target")]
        ratio = f"{row['ratio']:.2f}x" if row["ratio"] is not None else "-"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines)


def priority_comparison(with_priorities: dict, without_priorities: dict) -> dict:
    """Interactive requests' TTFT with priorities on, and on the same workload with them off."""
    on = with_priorities["ttft_seconds_by_priority"].get("interactive", {})
    off = without_priorities["ttft_seconds_by_priority"].get("interactive", {})
    ratios = {q: off[q] / on[q] if on.get(q) and off.get(q) else None for q in ("p50", "p90", "p99")}
    return {"interactive_ttft_with_priorities": on, "interactive_ttft_without_priorities": off, "ratio": ratios}


def format_priority_comparison(comparison: dict) -> str:
    on, off, ratio = (
        comparison[k] for k in ("interactive_ttft_with_priorities", "interactive_ttft_without_priorities", "ratio")
    )
    lines = ["| interactive TTFT | with priorities | without | better by |", "|---|---:|---:|---:|"]
    for q in ("p50", "p90", "p99"):
        if on.get(q) is not None and off.get(q) is not None:
            lines.append(f"| {q} | {on[q] * 1000:.0f} ms | {off[q] * 1000:.0f} ms | {ratio[q]:.1f}x |")
    return "\n".join(lines)
