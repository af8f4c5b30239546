"""Writes deploy/grafana/genserve-dashboard.json: `python deploy/grafana/make_dashboard.py`.

The panels are listed once here (title, unit, PromQL per series); the JSON is what Grafana imports.
"""

from __future__ import annotations

import json
from pathlib import Path

RATE = "[$__rate_interval]"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    legend = f" {{{{{by}}}}}" if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{RATE})))", f"p{int(q * 100)}{legend}")
        for q in (0.5, 0.9, 0.99)
    ]


PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Generated tokens / s", "short", [(f"sum(rate(genserve_generated_tokens_total{RATE}))", "tokens/s")]),
    ("Requests / s by code", "reqps", [(f"sum by (code) (rate(genserve_requests_total{RATE}))", "{{code}}")]),
    ("Time to first token", "s", quantiles("genserve_time_to_first_token_seconds")),
    ("Inter-token latency", "s", quantiles("genserve_inter_token_latency_seconds")),
    ("Request duration", "s", quantiles("genserve_request_duration_seconds", by="method")),
    ("Queue wait", "s", quantiles("genserve_queue_wait_seconds")),
    (
        "Queue and running requests",
        "short",
        [("sum(genserve_queue_size)", "queued"), ("sum(genserve_running_requests)", "running")],
    ),
    ("Batch occupancy (rows per step)", "short", [("avg(genserve_batch_size)", "rows")]),
    ("KV cache usage", "percentunit", [("max(genserve_kv_cache_usage_ratio)", "used")]),
    (
        "KV blocks (paged cache)",
        "short",
        [
            ("sum(genserve_kv_blocks) - sum(genserve_kv_blocks_free)", "held (shared blocks once)"),
            ("sum(genserve_kv_blocks_cached)", "free, holding a cached prefix"),
            ("sum(genserve_kv_blocks_free) - sum(genserve_kv_blocks_cached)", "free"),
        ],
    ),
    (
        "Engine step time p99 by phase",
        "s",
        [
            (
                f"histogram_quantile(0.99, sum by (le, phase) (rate(genserve_step_duration_seconds_bucket{RATE})))",
                "{{phase}}",
            )
        ],
    ),
    (
        "Errors / s by code",
        "reqps",
        [(f'sum by (code) (rate(genserve_requests_total{{code!="OK"}}{RATE}))', "{{code}}")],
    ),
    (
        "Prompt and generated tokens / s",
        "short",
        [
            (f"sum(rate(genserve_prompt_tokens_total{RATE}))", "prompt"),
            (f"sum(rate(genserve_generated_tokens_total{RATE}))", "generated"),
        ],
    ),
    (
        "Time to first token p99 by priority",
        "s",
        [(quantiles("genserve_time_to_first_token_seconds", by="priority")[2][0], "{{priority}}")],
    ),
    ("Preemptions / s", "short", [(f"sum by (cause) (rate(genserve_preemptions_total{RATE}))", "{{cause}}")]),
    (
        "Prefix cache and speculation tokens / s",
        "short",
        [
            (f"sum(rate(genserve_prefix_cache_queries_total{RATE}))", "prompt tokens looked up"),
            (f"sum(rate(genserve_prefix_cache_hits_total{RATE}))", "prompt tokens from the cache"),
            (f"sum(rate(genserve_speculative_proposed_tokens_total{RATE}))", "speculated"),
            (f"sum(rate(genserve_speculative_accepted_tokens_total{RATE}))", "accepted"),
        ],
    ),
    (
        "Prefix cache hit rate (prompt tokens)",
        "percentunit",
        [
            (
                f"sum(rate(genserve_prefix_cache_hits_total{RATE}))"
                f" / sum(rate(genserve_prefix_cache_queries_total{RATE}))",
                "hits / queries",
            )
        ],
    ),
    ("Model", "short", [("max by (model) (genserve_model_info)", "{{model}}")]),
]


def dashboard() -> dict:
    panels = []
    for index, (title, unit, series) in enumerate(PANELS):
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries",
                "title": title,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(series)
                ],
            }
        )
    return {
        "title": "genserve",
        "uid": "genserve-overview",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "tags": ["genserve", "llm"],
        "templating": {
            "list": [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    target = Path(__file__).with_name("genserve-dashboard.json")
    target.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {target}")
