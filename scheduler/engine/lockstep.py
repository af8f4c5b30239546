"""Tensor-parallel ranks in lockstep, as `generate(synced_gpus=True)` keeps them: every rank runs this same engine
(scheduler, runner, its shard of the model and of the KV cache), and rank 0, the leader, decides.

Only the leader takes requests. Each step it sends every rank what arrived since the last step (requests and
cancellations, in order) and the step's clock; each rank rebuilds the requests, then schedules, executes and
updates exactly as the leader does. So all ranks run the same plan on the same rows, every collective inside the
model pass is met, and every rank samples the same tokens: the vocabulary head's output is gathered whole on every
rank, and the generators are seeded alike and drawn alike. After the pass the ranks compare what they computed
(and take the leader's clock for the update); a difference ends the engine loudly instead of letting the ranks
drift apart. No rank leaves the loop alone: an idle leader still sends a step, with nothing to compute, every
half second, and stopping is a step every rank takes.

The leader watches its group (`RankWatch`): a rank process that exits, or a step that runs past
`EngineConfig.step_timeout`, ends the engine (`Engine.fail`); the service then fails every open stream with
UNAVAILABLE, turns health NOT_SERVING and exits non-zero with the whole group, as vLLM's engine-dead path does.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch.distributed as dist

from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import FinishReason, RequestOptions
from genserve.scheduler.core.step_plan import ModelOutput

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 0.5  # an idle leader's step interval: the followers wait in a collective for the next one


@dataclass(frozen=True)
class Arrival:
    """A request as every rank rebuilds it (the leader has validated it)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: GenerationParameters
    options: RequestOptions  # with request_id set
    arrival_time: float


@dataclass(frozen=True)
class Cancellation:
    request_id: str
    reason: FinishReason


@dataclass(frozen=True)
class StepInputs:
    """What the leader sends every rank before a step."""

    arrivals: tuple[Arrival | Cancellation, ...] = ()
    started: float = 0.0  # the step's clock (time.monotonic() on the leader)
    deadline_margin: float = 0.0
    stop: bool = False  # the engine stops: every rank leaves its loop now


class RanksDivergedError(RuntimeError):
    """The ranks computed different tokens in one step: their states can no longer be trusted to agree."""


class Lockstep:
    """This rank's place in the group: the leader shares each step's inputs, and every rank checks the outputs."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    @property
    def leads(self) -> bool:
        return self.rank == 0

    def share(self, inputs: StepInputs | None) -> StepInputs:
        """The leader's `inputs`, on every rank (followers pass None and wait for them)."""
        box = [inputs]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, output: ModelOutput, now: float) -> float:
        """Check that every rank computed the same step; the leader's clock after it, for the update."""
        computed = sorted(
            (request_id, result.token_ids, int(result.stop)) for request_id, result in output.results.items()
        )
        digest = zlib.crc32(repr((computed, sorted(output.errors))).encode())
        gathered: list[tuple[int, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, (digest, now))
        digests = [entry[0] for entry in gathered]
        if len(set(digests)) > 1:
            raise RanksDivergedError(f"the ranks computed different tokens in one step (digests by rank: {digests})")
        return gathered[0][1]


class RankProcess(Protocol):
    """A follower rank's process, as the leader sees it (subprocess.Popen is one)."""

    pid: int

    def poll(self) -> int | None: ...


class RankWatch:
    """The leader's watch over its followers and its own steps, on a thread of its own: a follower that exits, or
    a step running longer than `step_timeout`, calls `on_failure(reason)` once."""

    def __init__(
        self,
        followers: Sequence[RankProcess],
        step_timeout: float,
        busy_since: Callable[[], float | None],
        on_failure: Callable[[str], None],
        interval: float = 0.1,
    ) -> None:
        self.followers, self.step_timeout = list(followers), step_timeout
        self.busy_since, self.on_failure, self.interval = busy_since, on_failure, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="genserve-rank-watch", daemon=True)

    def start(self) -> RankWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            reason = self._failure()
            if reason is not None:
                self._done.set()
                self.on_failure(reason)

    def _failure(self) -> str | None:
        for rank, process in enumerate(self.followers, start=1):
            code = process.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}"
        since = self.busy_since()
        if since is not None and time.monotonic() - since > self.step_timeout:
            return f"an engine step has run for over {self.step_timeout:g} s (--step-timeout): a rank hangs"
        return None
