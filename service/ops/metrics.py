"""Prometheus metrics (prefix `genserve_`), served on --metrics-port at /metrics.

Gauges of engine state are read at scrape time (callbacks), so the engine loop pays nothing for them; per-step
figures arrive through the engine's `on_step` hook and cost one histogram observation per step.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from genserve.scheduler import AsyncEngine, StepStats

# LLM latencies span milliseconds (a decode step) to minutes (a long generation under load).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, engine: AsyncEngine, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "genserve_requests",
            "Finished requests by method, finish reason and gRPC code",
            ["method", "finish_reason", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "genserve_request_duration_seconds",
            "Time from arrival to the last token",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "genserve_queue_wait_seconds",
            "Time from arrival to prefill",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "genserve_time_to_first_token_seconds",
            "Time from arrival to the first token",
            ["priority"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefilled_requests = Counter(
            "genserve_prefilled_requests", "Requests prefilled (refused or expired ones never are)", registry=r
        )
        self.preemptions = Counter(
            "genserve_preemptions",
            "Requests sent back to the queue to be recomputed later: batch rows that yielded to interactive "
            "requests (cause=priority), or the least important when KV blocks ran out (cause=kv_cache)",
            ["cause"],
            registry=r,
        )
        for cause in ("priority", "kv_cache"):  # both series exist from the start, at 0
            self.preemptions.labels(cause=cause)
        self.prefix_cache_queried = Counter(
            "genserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's name)", registry=r
        )
        self.prefix_cache_hits = Counter(
            "genserve_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache (vLLM's name)", registry=r
        )
        self.speculated = Counter(
            "genserve_speculative_proposed_tokens", "Tokens proposed by speculative decoding and verified", registry=r
        )
        self.speculation_accepted = Counter(
            "genserve_speculative_accepted_tokens",
            "Proposed tokens the model agreed with (acceptance rate: accepted / proposed)",
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "genserve_inter_token_latency_seconds",
            "Time between consecutive tokens of a stream",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("genserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter(
            "genserve_generated_tokens", "Generated tokens of finished requests", registry=r
        )
        self.prompt_length = Histogram(
            "genserve_prompt_length_tokens", "Prompt length", buckets=LENGTH_BUCKETS, registry=r
        )
        self.generated_length = Histogram(
            "genserve_generated_length_tokens", "Generated length", buckets=LENGTH_BUCKETS, registry=r
        )
        self.step_duration = Histogram(
            "genserve_step_duration_seconds",
            "Engine step time; phase prefill when the step admitted rows",
            ["phase"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge("genserve_batch_size", "Rows in the last engine step", registry=r)
        Gauge("genserve_queue_size", "Requests waiting for a row", registry=r).set_function(
            lambda: engine.load_report().queue_size
        )
        Gauge("genserve_running_requests", "Requests holding a row", registry=r).set_function(
            lambda: engine.snapshot.num_running
        )
        Gauge(
            "genserve_kv_cache_usage_ratio",
            "KV blocks in use / blocks in the pool, a block shared by several requests counted once (paged cache); "
            "tokens held / rows x max context (slot cache)",
            registry=r,
        ).set_function(lambda: engine.snapshot.kv_cache_usage_ratio)
        Gauge(
            "genserve_kv_blocks_free", "Free blocks of the paged KV cache (0 with the slot cache)", registry=r
        ).set_function(lambda: engine.snapshot.kv_blocks_free)
        Gauge(
            "genserve_kv_blocks_cached",
            "Free blocks of the paged KV cache that still hold a cached prefix (reused on a hit, evicted least "
            "recently used first when the pool needs them)",
            registry=r,
        ).set_function(lambda: engine.snapshot.kv_blocks_cached)
        Gauge("genserve_kv_blocks", "Blocks in the paged KV cache's pool (0 with the slot cache)", registry=r).set(
            engine.snapshot.kv_blocks_total
        )
        model_info = Gauge("genserve_model_info", "The served model (value 1)", ["model"], registry=r)
        model_info.labels(model=engine.description.model_name).set(1)
        Gauge(
            "genserve_tensor_parallel_size",
            "Ranks the model is sharded over (--tensor-parallel-size; 1: unsharded)",
            registry=r,
        ).set(engine.description.config.tensor_parallel_size)
        self.adapter_requests = Counter(
            "genserve_lora_requests",
            "Finished requests per LoRA adapter, by gRPC code",
            ["adapter", "code"],
            registry=r,
        )
        self.adapter_generated_tokens = Counter(
            "genserve_lora_generated_tokens",
            "Generated tokens of finished requests per LoRA adapter",
            ["adapter"],
            registry=r,
        )
        self.adapter_load_time = Histogram(
            "genserve_lora_adapter_load_seconds",
            "Time to read and check a LoRA adapter (at start-up or on first use)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        if engine.description.config.serves_adapters:
            r.register(_LoraRequestsInfo(engine))
        engine.on_adapter_loaded(lambda name, seconds: self.adapter_load_time.observe(seconds))
        engine.on_step(self.record_step)

    def record_step(self, stats: StepStats) -> None:
        self.step_duration.labels(phase="prefill" if stats.num_prefilled else "decode").observe(stats.seconds)
        self.batch_size.set(stats.num_rows)
        self.prefilled_requests.inc(stats.num_prefilled)
        self.preemptions.labels(cause="priority").inc(stats.num_preempted)
        self.preemptions.labels(cause="kv_cache").inc(stats.num_preempted_for_kv)
        self.prefix_cache_queried.inc(stats.tokens.prefix_queried)
        self.prefix_cache_hits.inc(stats.tokens.prefix_hits)
        self.speculated.inc(stats.tokens.speculated)
        self.speculation_accepted.inc(stats.tokens.accepted)
        for priority, wait in stats.queue_waits:
            self.queue_wait.labels(priority=priority.name.lower()).observe(wait)

    def record_request(
        self,
        method: str,
        code: str,
        finish_reason: str,
        seconds: float,
        num_prompt_tokens: int,
        num_generated: int,
        adapter: str = "",
    ) -> None:
        self.requests.labels(method=method, finish_reason=finish_reason, code=code).inc()
        if adapter:
            self.adapter_requests.labels(adapter=adapter, code=code).inc()
            self.adapter_generated_tokens.labels(adapter=adapter).inc(num_generated)
        self.request_duration.labels(method=method).observe(seconds)
        if num_prompt_tokens:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.prompt_length.observe(num_prompt_tokens)
        self.generated_tokens.inc(num_generated)
        if code == "OK":
            self.generated_length.observe(num_generated)

    def serve(self, port: int, host: str) -> int:
        """Start the /metrics HTTP server; returns the bound port (0 asks for a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port


class _LoraRequestsInfo(Collector):
    """vLLM's `vllm:lora_requests_info`, which the Kubernetes Gateway API Inference Extension reads for adapter
    affinity: one series whose labels list the running and waiting adapters (comma-separated) and the adapter slots,
    and whose value is when it was read (the extension keeps the newest series)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        snapshot = self.engine.snapshot
        family = GaugeMetricFamily(
            "genserve_lora_requests_info",
            "Running and waiting LoRA adapters (labels) at the time of the value",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        labels = [
            ",".join(snapshot.running_adapters),
            ",".join(snapshot.waiting_adapters),
            str(self.engine.description.config.max_loras),
        ]
        family.add_metric(labels, time.time())
        yield family
