"""The scheduler decides, the runner computes.

Design: requests wait in a bounded queue (full: refused at once, so the caller can answer RESOURCE_EXHAUSTED
instead of letting latency grow without bound). Interactive requests are admitted before batch ones; within a
priority, one FIFO per client is served round-robin, so one client's burst cannot starve the others. Between
decode steps the scheduler admits waiting requests into free rows (bounded by the row limit, which the engine
lowers after an out-of-memory) as long as their prompt tokens stay within the per-step prefill budget; the
first admitted request is always taken even if it alone exceeds the budget, so a long prompt cannot starve.
It needs no torch and is unit-tested on its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from scheduler.request import Priority, Sequence


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
        # Per priority level (interactive first), one FIFO per client visited round-robin: a client's burst waits
        # behind itself, not in front of others. Dict order is the visiting order; a served client moves last.
        self._levels: dict[Priority, dict[str, deque[Sequence]]] = {level: {} for level in sorted(Priority)}
        self._num_waiting = 0
        self._lock = threading.Lock()

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def num_waiting_at(self, priority: Priority) -> int:
        with self._lock:
            return sum(len(queue) for queue in self._levels[priority].values())

    @property
    def num_waiting_tokens(self) -> int:
        with self._lock:
            return sum(seq.num_tokens for seq in self._all_waiting())

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if self._num_waiting >= self.config.max_queue:
                raise QueueFullError(f"queue is full ({self.config.max_queue} requests waiting)")
            self._queue_of(seq).append(seq)
            self._num_waiting += 1

    def remove(self, request_id: str) -> Sequence | None:
        """Take a still-waiting request out of the queue (cancel before prefill)."""
        with self._lock:
            for level in self._levels.values():
                for client, queue in level.items():
                    for seq in queue:
                        if seq.request_id == request_id:
                            queue.remove(seq)
                            if not queue:
                                del level[client]
                            self._num_waiting -= 1
                            return seq
        return None

    def remove_expired(self, now: float) -> list[Sequence]:
        """Take out the waiting requests whose deadline has passed."""
        with self._lock:
            expired = [s for s in self._all_waiting() if s.options.deadline is not None and s.options.deadline <= now]
        return [seq for seq in expired if self.remove(seq.request_id) is not None]

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put requests back at the head of their clients' queues, in order (after an out-of-memory or a
        preemption); no limit applies, they were accepted already."""
        with self._lock:
            for seq in reversed(seqs):
                self._queue_of(seq).appendleft(seq)
            self._num_waiting += len(seqs)

    def admit(self, num_running: int, row_limit: int | None = None) -> list[Sequence]:
        """Pop the requests to prefill this step, given how many rows are in use (a request with classifier-free
        guidance takes two)."""
        admitted: list[Sequence] = []
        budget = self.config.max_prefill_tokens
        limit = min(row_limit or self.config.max_running, self.config.max_running)
        with self._lock:
            for level in self._levels.values():
                while level:
                    client, queue = next(iter(level.items()))
                    slots = queue[0].num_slots
                    # An empty batch takes a guided request (two rows) even under a row limit lowered to one.
                    fits = num_running + slots <= limit or (num_running == 0 and slots <= self.config.max_running)
                    if not fits or (admitted and queue[0].num_tokens > budget):
                        break
                    num_running += queue[0].num_slots
                    budget -= queue[0].num_tokens
                    admitted.append(queue.popleft())
                    del level[client]
                    if queue:
                        level[client] = queue
            self._num_waiting -= len(admitted)
        return admitted

    def _queue_of(self, seq: Sequence) -> deque[Sequence]:
        return self._levels[seq.options.priority].setdefault(seq.options.client_id, deque())

    def _all_waiting(self) -> Iterator[Sequence]:
        return (seq for level in self._levels.values() for queue in level.values() for seq in queue)
