"""The bounded queue of requests waiting for a row: interactive before batch, clients served round-robin.

Full: refused at once, so the caller can answer RESOURCE_EXHAUSTED instead of letting latency grow without bound.
Within a priority level, one FIFO per client is visited round-robin, so one client's burst waits behind itself,
not in front of others. Callers on any thread add and remove; the engine thread admits.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

from genserve.scheduler.core.request import Priority, Sequence


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; maps to RESOURCE_EXHAUSTED at the service edge."""


class WaitingQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        # Per priority level (interactive first), one FIFO per client; dict order is the visiting order and a
        # served client moves last.
        self._levels: dict[Priority, dict[str, deque[Sequence]]] = {level: {} for level in sorted(Priority)}
        self._size = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    def count_at(self, priority: Priority) -> int:
        with self._lock:
            return sum(len(queue) for queue in self._levels[priority].values())

    @property
    def num_tokens(self) -> int:
        with self._lock:
            return sum(seq.num_tokens for seq in self._all())

    def adapters(self) -> set[str]:
        """The LoRA adapters that waiting requests name ("" for the base model)."""
        with self._lock:
            return {seq.options.adapter for seq in self._all()}

    def add(self, seq: Sequence) -> None:
        with self._lock:
            if self._size >= self.max_size:
                raise QueueFullError(f"queue is full ({self.max_size} requests waiting)")
            self._queue_of(seq).append(seq)
            self._size += 1

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
                            self._size -= 1
                            return seq
        return None

    def remove_expired(self, now: float) -> list[Sequence]:
        """Take out the waiting requests whose deadline has passed."""
        with self._lock:
            expired = [s for s in self._all() if s.options.deadline is not None and s.options.deadline <= now]
        return [seq for seq in expired if self.remove(seq.request_id) is not None]

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put requests back at the head of their clients' queues, in order (after an out-of-memory or a
        preemption); no limit applies, they were accepted already."""
        with self._lock:
            for seq in reversed(seqs):
                self._queue_of(seq).appendleft(seq)
            self._size += len(seqs)

    def pop_while(self, accept: Callable[[Sequence], bool]) -> list[Sequence]:
        """Pop requests in serving order as long as `accept(next request)` says yes (it stops at the first no)."""
        taken: list[Sequence] = []
        with self._lock:
            for level in self._levels.values():
                while level:
                    client, queue = next(iter(level.items()))
                    if not accept(queue[0]):
                        break
                    taken.append(queue.popleft())
                    del level[client]
                    if queue:
                        level[client] = queue
            self._size -= len(taken)
        return taken

    def _queue_of(self, seq: Sequence) -> deque[Sequence]:
        return self._levels[seq.options.priority].setdefault(seq.options.client_id, deque())

    def _all(self) -> Iterator[Sequence]:
        return (seq for level in self._levels.values() for queue in level.values() for seq in queue)
