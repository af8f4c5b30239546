"""The scheduler decides, the runner computes.

Design: requests wait in a FIFO queue (bounded: a full queue refuses at once, so the caller can answer
RESOURCE_EXHAUSTED instead of letting latency grow without bound). Between decode steps the scheduler admits
waiting requests into free rows, first come first served, as long as their prompt tokens stay within the
per-step prefill budget; the first admitted request is always taken even if it alone exceeds the budget, so a
long prompt cannot starve. It needs no torch and is unit-tested on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

from scheduler.request import Sequence


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; maps to RESOURCE_EXHAUSTED at the service edge."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 32
    max_prefill_tokens: int = 4096
    max_queue: int = 1024
    max_context: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_running", "max_prefill_tokens", "max_queue", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"queue is full ({self.config.max_queue} requests waiting)")
            self._waiting.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a still-waiting request out of the queue (cancel before prefill)."""
        with self._lock:
            for seq in self._waiting:
                if seq.request_id == request_id:
                    self._waiting.remove(seq)
                    return seq
        return None

    def admit(self, num_running: int) -> list[Sequence]:
        """Pop the requests to prefill this step, given how many rows are already running."""
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        with self._lock:
            while self._waiting and num_running + len(admitted) < self.config.max_running:
                if admitted and self._waiting[0].num_tokens > budget:
                    break
                budget -= self._waiting[0].num_tokens
                admitted.append(self._waiting.popleft())
        return admitted
