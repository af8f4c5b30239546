"""`genserve loadtest`: a seeded load against a running server: latency percentiles, goodput, plots."""

from __future__ import annotations

import argparse
import sys

from genserve.service.cli.flags import env_default, int_range


def cmd_loadtest(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from dataclasses import replace
    from pathlib import Path

    from genserve.service.benchmarks.loadtest import (
        SLO,
        WorkloadSpec,
        completed_requests,
        format_priority_comparison,
        format_summary,
        format_target_comparison,
        plot,
        priority_comparison,
        replica_shares,
        run_load,
        summarize,
        target_comparison,
    )

    spec = WorkloadSpec(
        num_requests=args.num_requests,
        arrival=args.arrival,
        rate=args.rate,
        concurrency=args.concurrency,
        prompt_words=int_range(args.prompt_words, "--prompt-words"),
        max_new_tokens=int_range(args.max_new_tokens, "--max-new-tokens"),
        prompt_mode=args.prompt_mode,
        batch_fraction=args.batch_fraction,
        jsonl=args.jsonl,
        seed=args.seed,
        long_prompt_fraction=args.long_prompt_fraction,
        long_prompt_words=args.long_prompt_words,
    )
    slo = SLO(args.slo_ttft, args.slo_itl)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
    metrics_urls = [url for url in args.replica_metrics.split(",") if url]
    reports = []
    for rate in rates:
        run_spec = replace(spec, rate=rate, arrival="poisson") if rate is not None else spec
        before = [completed_requests(url) for url in metrics_urls]
        records, seconds = asyncio.run(run_load(args.target, run_spec, lb_policy=args.lb_policy))
        report = summarize(records, seconds, slo)
        if metrics_urls:
            report["replicas"] = replica_shares(metrics_urls, before, [completed_requests(u) for u in metrics_urls])
            print("requests per replica: " + ", ".join(f"{r['replica']} {r['share']:.0%}" for r in report["replicas"]))
        reports.append((rate, report))
        print((f"offered load {rate:g} req/s\n" if rate is not None else "") + format_summary(report))
    comparison = None
    if args.compare_priorities:
        records, seconds = asyncio.run(run_load(args.target, replace(spec, ignore_priorities=True)))
        without = summarize(records, seconds, slo)
        comparison = priority_comparison(reports[0][1], without)
        print(format_priority_comparison(comparison))
    against = []
    if args.compare_target:
        for rate, report in reports:
            run_spec = replace(spec, rate=rate, arrival="poisson") if rate is not None else spec
            records, seconds = asyncio.run(run_load(args.compare_target, run_spec))
            rows = target_comparison(report, summarize(records, seconds, slo))
            against.append({"offered_rate": rate, "rows": rows})
            heading = f"offered load {rate:g} req/s: " if rate is not None else ""
            print(f"{heading}{args.target} against {args.compare_target}, the same requests")
            print(format_target_comparison(rows, (args.target, args.compare_target)))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    result = {
        "target_comparison": against or None,
        "priority_comparison": comparison,
        "target": args.target,
        "workload": vars(args) | {"handler": None},
        "runs": [{"offered_rate": rate, **{k: v for k, v in report.items() if k != "raw"}} for rate, report in reports],
    }
    (output / "loadtest.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    for path in plot(reports, output):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {output / 'loadtest.json'}", file=sys.stderr)
    return 0 if all(set(r["codes"]) <= {"OK"} for _, r in reports) else 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    load = commands.add_parser(
        "loadtest",
        help="seeded load against a running server: latency percentiles, goodput, plots",
        description="Sends a seeded workload of streaming requests and reports throughput, time to first token, "
        "inter-token latency and end-to-end latency (p50/p90/p99), errors by gRPC code, and goodput under the "
        "SLOs. Writes loadtest.json and PNG plots (latency CDFs; with --rates, throughput and TTFT against "
        "offered load) to --output. Exits 1 if any request failed.",
    )
    load.add_argument(
        "--target",
        default=env_default("target", "localhost:50051"),
        help="host:port, or several comma-separated (balanced by --lb-policy), or a proxy in front of replicas",
    )
    load.add_argument(
        "--lb-policy",
        choices=["round_robin", "weighted_round_robin", "pick_first"],
        default="round_robin",
        help="how the client balances several targets; weighted_round_robin follows the replicas' ORCA reports",
    )
    load.add_argument(
        "--replica-metrics",
        default="",
        help="comma-separated /metrics URLs of the replicas: the report gives each one's share of the requests",
    )
    load.add_argument("--num-requests", type=int, default=100)
    load.add_argument("--arrival", choices=["poisson", "burst", "closed"], default="poisson")
    load.add_argument("--rate", type=float, default=4.0, help="requests/s for poisson arrivals")
    load.add_argument("--rates", default="", help="comma-separated rates: one poisson run each (a load sweep)")
    load.add_argument("--concurrency", type=int, default=8, help="clients for --arrival closed")
    load.add_argument("--prompt-words", default="8,64", help="MIN,MAX words per synthetic prompt")
    load.add_argument("--max-new-tokens", default="16,128", help="MIN,MAX max_new_tokens per request")
    load.add_argument("--prompt-mode", choices=["text", "ids"], default="text", help="ids: random token ids")
    load.add_argument("--jsonl", help='prompts from a file: one {"prompt": ..., "max_new_tokens": ...} per line')
    load.add_argument("--seed", type=int, default=0)
    load.add_argument(
        "--long-prompt-fraction",
        type=float,
        default=0.0,
        help="share of synthetic prompts that are long (--long-prompt-words words), to see their prefill's effect",
    )
    load.add_argument("--long-prompt-words", type=int, default=1200, help="words in a long synthetic prompt")
    load.add_argument(
        "--compare-target",
        help="after the runs, send the same requests to this server too (e.g. one started with other flags) and "
        "print each latency percentile of both and their ratio",
    )
    load.add_argument("--batch-fraction", type=float, default=0.0, help="share of requests sent with priority BATCH")
    load.add_argument(
        "--compare-priorities",
        action="store_true",
        help="run the workload again with every request INTERACTIVE and report the interactive TTFT ratio",
    )
    load.add_argument("--slo-ttft", type=float, default=2.0, help="seconds; goodput counts requests within both SLOs")
    load.add_argument("--slo-itl", type=float, default=0.5, help="seconds, on each request's median token gap")
    load.add_argument("--output", default="loadtest-results", help="folder for loadtest.json and the plots")
    load.set_defaults(handler=cmd_loadtest)
