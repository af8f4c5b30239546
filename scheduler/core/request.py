"""One `Sequence` per request: its ids, parameters, status and finish reason.

Counts (`num_generated`, `is_finished`) are derived from the ids and the finish reason, never tracked twice.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field

from genserve.scheduler.core.params import GenerationParameters, ValidationError


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `spec` is the regex, the schema (JSON text), the grammar, or for `choice`
    a JSON list of the allowed strings."""

    kind: str
    spec: str

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if not options or not all(options):
            raise ValidationError("choice", "give at least one non-empty string")
        return cls("choice", json.dumps(options))


class FinishReason(enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_STRING = "stop_string"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    STOPPING_CRITERIA = "stopping_criteria"
    CONSTRAINT_COMPLETE = "constraint_complete"


class Priority(enum.IntEnum):
    """Lower is served first. Batch rows yield to waiting interactive requests and resume later."""

    INTERACTIVE = 0
    BATCH = 1


@dataclass(frozen=True)
class RequestOptions:
    """What a request asks of the engine besides generation parameters."""

    request_id: str | None = None  # generated when not given
    client_id: str = ""  # requests of one client queue behind each other; clients are served round-robin
    top_logprobs: int | None = None  # None: no logprobs; n >= 0: the chosen token's and the n best per step
    processed_logprobs: bool = False  # logprobs of the distribution sampled from, not the model's raw one
    deadline: float | None = None  # time.monotonic() by which the caller needs the answer
    partial_on_deadline: bool = False  # at the deadline, end with TIME_LIMIT and what was generated so far
    priority: Priority = Priority.INTERACTIVE
    # Registered custom components this request enables: (name, JSON keyword arguments).
    logits_processors: tuple[tuple[str, str], ...] = ()
    stopping_criteria: tuple[tuple[str, str], ...] = ()
    constraint: Constraint | None = None  # the output must match it (compiled by the engine's GrammarCompiler)
    # Classifier-free guidance's unconditional prompt; None: the prompt's last token, as generate() does.
    negative_prompt_ids: tuple[int, ...] | None = None
    # Prefix caching: only requests with the same salt share cached KV blocks (tenants apart, against timing attacks).
    cache_salt: str = ""
    # The LoRA adapter this request runs with, by name ("": the base model). Its KV is never shared with another
    # adapter's, and a step holds at most EngineConfig.max_loras distinct adapters.
    adapter: str = ""


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: GenerationParameters
    arrival_time: float = field(default_factory=time.monotonic)
    generated_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # Set when the row is prefilled; max_time counts from here, like HF's MaxTimeCriteria counts from generate().
    start_time: float | None = None
    first_token_time: float | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    # The runner's torch.Generator for a seeded request, kept here so a preempted request resumes its draws.
    sampler_generator: object | None = None
    # This request's own instances of the custom components it enabled (HF LogitsProcessor / StoppingCriteria).
    custom_processors: tuple[object, ...] = ()
    custom_criteria: tuple[object, ...] = ()
    # The request's llguidance matcher when its output is constrained; advanced by one token per step.
    grammar: object | None = None
    # Classifier-free guidance: the unconditional branch, a row of its own that shares this request's generated
    # tokens (the same list) and never reaches the engine's callers.
    companion: Sequence | None = None
    is_companion: bool = False
    # Tokens whose KV the runner holds, advanced chunk by chunk while the prompt prefills (vLLM's
    # num_computed_tokens); back to 0 when the request is preempted and its row freed.
    num_computed_tokens: int = 0
    # The chained hashes of its full blocks, computed once by the KV block pool (kv_blocks.py) as they are needed.
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.generated_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    @property
    def num_slots(self) -> int:
        """Batch rows this request occupies: two with classifier-free guidance."""
        return 1 if self.companion is None else 2

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability (raw or processed distribution, as asked) and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int = 1  # one-based: 1 + how many tokens are strictly more likely


@dataclass(frozen=True)
class TokenEvent:
    """What the engine thread reports for one request after one step: its new token and, at the end, why it ended."""

    request_id: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    error: str | None = None  # the step failed for this request; it has ended without a finish reason
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked
