"""The scheduler decides, the runner computes.

Design: requests wait in a bounded queue (full: refused at once, so the caller can answer RESOURCE_EXHAUSTED
instead of letting latency grow without bound), one FIFO per client served round-robin, so one client's burst
cannot starve the others. Between decode steps the scheduler admits waiting requests into free rows (bounded
by the row limit, which the engine lowers after an out-of-memory) as long as their prompt tokens stay within the
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
    max_running: int = 64
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
        # One FIFO per client, visited round-robin: a client's burst waits behind itself, not in front of others.
        # Dict order is the visiting order; a client that was just served moves to the end.
        self._waiting: dict[str, deque[Sequence]] = {}
        self._num_waiting = 0
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if self._num_waiting >= self.config.max_queue:
                raise QueueFullError(f"queue is full ({self.config.max_queue} requests waiting)")
            self._waiting.setdefault(seq.client_id, deque()).append(seq)
            self._num_waiting += 1

    def remove(self, request_id: str) -> Sequence | None:
        """Take a still-waiting request out of the queue (cancel before prefill)."""
        with self._lock:
            for client, queue in self._waiting.items():
                for seq in queue:
                    if seq.request_id == request_id:
                        queue.remove(seq)
                        if not queue:
                            del self._waiting[client]
                        self._num_waiting -= 1
                        return seq
        return None

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put requests back at the head of their clients' queues, in order (after an out-of-memory); no limit
        applies, they were accepted already."""
        with self._lock:
            for seq in reversed(seqs):
                self._waiting.setdefault(seq.client_id, deque()).appendleft(seq)
            self._num_waiting += len(seqs)

    def admit(self, num_running: int, row_limit: int | None = None) -> list[Sequence]:
        """Pop the requests to prefill this step, given how many rows are already running."""
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        limit = min(row_limit or self.config.max_running, self.config.max_running)
        with self._lock:
            while self._waiting and num_running + len(admitted) < limit:
                client, queue = next(iter(self._waiting.items()))
                if admitted and queue[0].num_tokens > budget:
                    break
                budget -= queue[0].num_tokens
                admitted.append(queue.popleft())
                del self._waiting[client]
                if queue:
                    self._waiting[client] = queue
            self._num_waiting -= len(admitted)
        return admitted
