"""The scheduler alone: no model, no torch tensors."""

from __future__ import annotations

import pytest

from scheduler.params import GenerationParameters
from scheduler.request import RequestOptions, Sequence
from scheduler.scheduler import QueueFullError, Scheduler, SchedulerConfig


def _seq(request_id: str, length: int) -> Sequence:
    return Sequence(request_id, list(range(length)), GenerationParameters())


def test_full_queue_refuses() -> None:
    scheduler = Scheduler(SchedulerConfig(max_queue=2))
    scheduler.add(_seq("a", 3))
    scheduler.add(_seq("b", 3))
    with pytest.raises(QueueFullError):
        scheduler.add(_seq("c", 3))
    assert scheduler.num_waiting == 2


def test_admission_is_fifo_and_bounded_by_free_rows() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=4))
    for name in "abcdef":
        scheduler.add(_seq(name, 3))
    assert [s.request_id for s in scheduler.admit(num_running=1)] == ["a", "b", "c"]
    assert scheduler.admit(num_running=4) == []
    assert [s.request_id for s in scheduler.admit(num_running=2)] == ["d", "e"]


def test_prefill_budget_counts_prompt_tokens_but_always_admits_one() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=8, max_prefill_tokens=100))
    scheduler.add(_seq("huge", 300))
    scheduler.add(_seq("small", 10))
    scheduler.add(_seq("medium", 40))
    scheduler.add(_seq("more", 60))
    assert [s.request_id for s in scheduler.admit(0)] == ["huge"]
    assert [s.request_id for s in scheduler.admit(1)] == ["small", "medium"]  # + 60 would make 110 > 100
    assert [s.request_id for s in scheduler.admit(3)] == ["more"]


def test_remove_takes_a_waiting_request_out() -> None:
    scheduler = Scheduler(SchedulerConfig())
    scheduler.add(_seq("a", 3))
    scheduler.add(_seq("b", 3))
    assert scheduler.remove("a").request_id == "a"
    assert scheduler.remove("zzz") is None
    assert [s.request_id for s in scheduler.admit(0)] == ["b"]


def _client_seq(request_id: str, client: str) -> Sequence:
    return Sequence(request_id, [1, 2, 3], GenerationParameters(), options=RequestOptions(client_id=client))


def test_clients_are_served_round_robin_so_a_burst_cannot_starve_others() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=4))
    for i in range(10):
        scheduler.add(_client_seq(f"a{i}", "burst"))
    scheduler.add(_client_seq("b0", "polite"))
    scheduler.add(_client_seq("b1", "polite"))
    scheduler.add(_client_seq("c0", "other"))
    assert [s.request_id for s in scheduler.admit(0)] == ["a0", "b0", "c0", "a1"]
    assert [s.request_id for s in scheduler.admit(2)] == ["b1", "a2"]
    assert scheduler.num_waiting == 7


def test_requeue_puts_requests_back_first_and_row_limit_caps_admission() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=8))
    for name in "abc":
        scheduler.add(_seq(name, 3))
    taken = scheduler.admit(0, row_limit=2)
    assert [s.request_id for s in taken] == ["a", "b"]
    scheduler.requeue(taken)
    assert scheduler.num_waiting == 3
    assert [s.request_id for s in scheduler.admit(0)] == ["a", "b", "c"]


def test_guided_requests_count_two_rows_and_an_empty_batch_always_takes_one() -> None:
    scheduler = Scheduler(SchedulerConfig(max_running=4))
    guided = [_seq(name, 3) for name in "gh"]
    for seq in guided:
        seq.companion = Sequence(f"{seq.request_id}/unconditional", [1], GenerationParameters(), is_companion=True)
        scheduler.add(seq)
    scheduler.add(_seq("p", 3))
    assert [s.request_id for s in scheduler.admit(num_running=1)] == ["g"]  # 1 + 2 rows; h would need 5
    # After an out-of-memory lowered the row limit to one, an empty batch still admits a guided request.
    assert [s.request_id for s in scheduler.admit(num_running=0, row_limit=1)] == ["h"]
    assert [s.request_id for s in scheduler.admit(num_running=2, row_limit=3)] == ["p"]
