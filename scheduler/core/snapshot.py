"""What the engine publishes after every step, for readers on other threads: each value is whole and immutable,
so a reader sees one step, never a step half applied."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.request import Priority


@dataclass(frozen=True)
class TokenCounters:
    """Running totals of the runner's token savings (zeros for what is off)."""

    prefix_queried: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which copied from it instead of computed
    speculated: int = 0  # proposals verified by speculative decoding
    accepted: int = 0  # of which the model agreed with (each saves a forward pass)

    def __sub__(self, other: TokenCounters) -> TokenCounters:
        return TokenCounters(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclass(frozen=True)
class StepStats:
    num_prefilled: int  # requests that got a row this step
    num_rows: int  # rows that got a token
    seconds: float
    queue_waits: tuple[tuple[Priority, float], ...]  # arrival to first chunk, for each request admitted this step
    num_preempted: int = 0  # batch rows that yielded to interactive requests before this step
    tokens: TokenCounters = TokenCounters()  # this step's prefix-cache and speculation figures
    num_prefill_tokens: int = 0  # prompt tokens computed this step (whole prompts and chunks)
    num_preempted_for_kv: int = 0  # requests sent back to the queue because the KV blocks ran out


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its latest step, published whole (readers on other threads see one step)."""

    num_running: int = 0  # requests holding rows (decoding or prefilling)
    num_prefilling: int = 0  # of which still computing their prompt
    num_slots: int = 0  # rows held, guidance companions included
    row_limit: int = 0
    tokens_held: int = 0  # KV positions the running requests hold
    kv_cache_usage_ratio: float = 0.0  # paged: blocks in use over blocks in the pool
    kv_blocks_free: int = 0  # paged cache only (0 with the slot cache)
    kv_blocks_total: int = 0
    kv_blocks_cached: int = 0  # of the free blocks, those holding a cached prefix (prefix caching)
    running_adapters: tuple[str, ...] = ()  # LoRA adapters of the requests holding rows
    waiting_adapters: tuple[str, ...] = ()  # LoRA adapters of waiting requests (not running)

    @property
    def free_rows(self) -> int:
        return max(0, self.row_limit - self.num_slots)


@dataclass(frozen=True)
class ModelDescription:
    """What the front ends tell clients about the served model and the engine's limits (ModelInfo, TGIS)."""

    model_name: str
    vocab_size: int
    config: EngineConfig  # the limits: rows, queue, context, tokens per step, prefix caching
    kv_cache_tokens: int  # paged cache: positions the pool holds; 0 with the slot cache
    kv_block_size: int  # paged cache: positions per block; 0 with the slot cache
    assistant_model: str  # the draft model's name, "" without one
    architecture: str  # the transformers class served
    attn_implementation: str


@dataclass(frozen=True)
class LoadReport:
    """The engine's load as a client or a load balancer would want it (gRPC ORCA trailers, RetryInfo)."""

    queue_size: int
    running_requests: int
    max_running: int
    kv_cache_usage_ratio: float
    tokens_in_flight: int
    retry_delay_seconds: float
