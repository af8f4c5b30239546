"""Measured rates that predict waits: how long a step takes, what a prompt token costs to prefill, how fast rows
free up. They drive deadline-aware admission and the retry delay suggested to clients on overload.

Estimates are optimistic when nothing has been measured yet: an idle server must not refuse work.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class LoadEstimator:
    smoothing: float = 0.2  # weight of the newest sample in the moving averages
    window_seconds: float = 30.0  # finishes counted for the release rate
    step_seconds: float | None = None
    prefill_seconds_per_token: float | None = None
    _finishes: deque[float] = field(default_factory=deque)

    def record_step(self, seconds: float, num_prefill_tokens: int) -> None:
        decode_seconds = self.step_seconds if self.step_seconds is not None else 0.0
        if num_prefill_tokens:
            per_token = max(seconds - decode_seconds, 0.0) / num_prefill_tokens
            self.prefill_seconds_per_token = self._average(self.prefill_seconds_per_token, per_token)
        else:
            self.step_seconds = self._average(self.step_seconds, seconds)

    def record_finished(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._finishes.extend([now] * count)
        self._forget_before(now - self.window_seconds)

    def release_rate(self, now: float | None = None) -> float | None:
        """Rows freed per second over the recent window; None before anything finished."""
        now = time.monotonic() if now is None else now
        self._forget_before(now - self.window_seconds)
        if not self._finishes:
            return None
        span = max(now - self._finishes[0], self.step_seconds or 0.0, 1e-3)
        return len(self._finishes) / span

    def first_token_delay(
        self, requests_ahead: int, tokens_ahead: int, free_rows: int, own_tokens: int, now: float | None = None
    ) -> float:
        """Predicted seconds until a request joining the queue now gets its first token."""
        prefill = (tokens_ahead + own_tokens) * (self.prefill_seconds_per_token or 0.0)
        step = self.step_seconds or 0.0
        rows_needed = requests_ahead + 1 - free_rows
        if rows_needed <= 0:
            return step + prefill
        rate = self.release_rate(now)
        if rate is None:
            return step + prefill  # nothing measured yet: assume it fits
        return rows_needed / rate + step + prefill

    def retry_delay(self, num_waiting: int, now: float | None = None) -> float:
        """Seconds after which a refused client can expect room: the queue's drain time, within [0.1, 60]."""
        rate = self.release_rate(now)
        estimate = num_waiting / rate if rate else 1.0
        return min(max(estimate, 0.1), 60.0)

    def _average(self, current: float | None, sample: float) -> float:
        return sample if current is None else (1 - self.smoothing) * current + self.smoothing * sample

    def _forget_before(self, cutoff: float) -> None:
        while self._finishes and self._finishes[0] < cutoff:
            self._finishes.popleft()
