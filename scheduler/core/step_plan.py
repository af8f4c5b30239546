"""A step as data: what the scheduler decides (`StepPlan`) and what the runner computed (`ModelOutput`).

Both are plain frozen values without tensors, so a scheduling policy is tested by reading its plans and feeding
it made-up outputs, with no model. Every request computes "its next tokens" in a step: a decoding row one token
(more when speculation is accepted), a prefilling one a chunk of its prompt, `PrefillChunk(start, end)`; the chunk
that reaches the end of the prompt also yields the request's next token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from genserve.scheduler.core.request import Sequence, TokenLogprob


class StopCode(enum.IntEnum):
    """Why a row stops, decided on the device in the step (the others, time limits and deadlines, by update)."""

    RUNNING = 0
    EOS_TOKEN = 1
    LENGTH = 2
    STOPPING_CRITERIA = 3
    CONSTRAINT_COMPLETE = 4


@dataclass(frozen=True)
class PrefillChunk:
    """Compute the KV of tokens [start, end) of `seq` (prompt, and generated tokens when a preempted request
    resumes). The first chunk since admission gives the request its row; it starts after the cached prefix the
    request found (0 without one)."""

    seq: Sequence
    start: int
    end: int
    first: bool = False

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def tokens(self) -> list[int]:
        return (self.seq.prompt_ids + self.seq.generated_ids)[self.start : self.end]

    @property
    def completes(self) -> bool:
        """The last chunk: the request decodes from the next step on, and gets its next token now."""
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    released: tuple[Sequence, ...] = ()  # rows freed before computing: cancelled, expired or preempted requests
    preempted: tuple[Sequence, ...] = ()  # of which sent back to the queue (they resume by recomputing)
    prefills: tuple[PrefillChunk, ...] = ()  # in row order: continuing chunks first, then new requests
    decodes: tuple[Sequence, ...] = ()  # rows that get their next token
    speculate: bool = False  # the decoding rows that asked for speculation propose tokens this step
    num_preempted_for_kv: int = 0  # of the preempted, how many for lack of free KV blocks (the rest for priority)
    # Paged KV cache: how many blocks each request (or guidance companion) whose blocks grew now holds.
    kv_blocks: tuple[tuple[Sequence, int], ...] = ()

    @property
    def num_batched_tokens(self) -> int:
        return len(self.decodes) + sum(chunk.num_tokens for chunk in self.prefills)

    @property
    def admitted(self) -> tuple[Sequence, ...]:
        """Requests that get a row this step (their first chunk)."""
        return tuple(chunk.seq for chunk in self.prefills if chunk.first)

    @property
    def has_work(self) -> bool:
        return bool(self.prefills or self.decodes)


@dataclass(frozen=True)
class RowResult:
    token_ids: tuple[int, ...]  # one, or more when speculation was accepted
    stop: StopCode
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class ModelOutput:
    """The runner's answer to a plan, keyed by request id."""

    results: dict[str, RowResult] = field(default_factory=dict)  # every request that got a token
    # Requests whose own work raised (their prefill, a custom processor or criterion): they end with the error.
    errors: dict[str, str] = field(default_factory=dict)
