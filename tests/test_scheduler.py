"""The scheduler alone: plans read as data and fed made-up model outputs; no model, no torch tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import FinishReason, Priority, RequestOptions, Sequence
from genserve.scheduler.core.scheduler import STEPS_TO_REGROW_ONE_ROW, Scheduler
from genserve.scheduler.core.step_plan import ModelOutput, RowResult, StepPlan, StopCode
from genserve.scheduler.core.waiting_queue import QueueFullError


def _seq(request_id: str, length: int, max_new_tokens: int = 50, **options: object) -> Sequence:
    return Sequence(
        request_id,
        list(range(length)),
        GenerationParameters(max_new_tokens=max_new_tokens),
        options=RequestOptions(**options),
    )


def _scheduler(*seqs: Sequence, **config: object) -> Scheduler:
    scheduler = Scheduler(EngineConfig(**config))
    for seq in seqs:
        scheduler.add(seq)
    return scheduler


def _ids(seqs: tuple[Sequence, ...] | list[Sequence]) -> list[str]:
    return [seq.request_id for seq in seqs]


def _chunks(plan: StepPlan) -> list[tuple[str, int, int]]:
    return [(chunk.seq.request_id, chunk.start, chunk.end) for chunk in plan.prefills]


def _output(plan: StepPlan, stops: dict[str, StopCode] | None = None, errors: dict[str, str] | None = None):
    """What a model would answer: token 7 for every row that gets a token (decoding rows and completed prompts)."""
    stops = stops or {}
    getting = [*plan.decodes, *(chunk.seq for chunk in plan.prefills if chunk.completes)]
    results = {
        seq.request_id: RowResult((7,), stops.get(seq.request_id, StopCode.RUNNING))
        for seq in getting
        if seq.request_id not in (errors or {})
    }
    return ModelOutput(results, errors or {})


def _step(scheduler: Scheduler, now: float = 0.0, **output: object) -> tuple[StepPlan, list, list[Sequence]]:
    plan, _ = scheduler.schedule(now)
    events, ended = scheduler.update(plan, _output(plan, **output), now, deadline_margin=0.0)
    return plan, events, ended


def test_full_queue_refuses() -> None:
    scheduler = _scheduler(_seq("a", 3), _seq("b", 3), max_queue=2)
    with pytest.raises(QueueFullError):
        scheduler.add(_seq("c", 3))
    assert len(scheduler.waiting) == 2


def test_admission_is_fifo_and_bounded_by_free_rows() -> None:
    scheduler = _scheduler(*(_seq(name, 3) for name in "abcdef"), max_running=4)
    plan, events, _ = _step(scheduler)
    assert _ids(plan.admitted) == ["a", "b", "c", "d"] and not plan.decodes
    assert [event.token_ids for event in events] == [(7,)] * 4  # whole prompts: each gets its first token
    plan, _, ended = _step(scheduler, stops={"b": StopCode.EOS_TOKEN})
    assert _ids(plan.decodes) == ["a", "b", "c", "d"] and not plan.admitted
    assert _ids(ended) == ["b"] and ended[0].finish_reason is FinishReason.EOS_TOKEN
    plan, _, _ = _step(scheduler)
    assert _ids(plan.admitted) == ["e"] and _ids(plan.decodes) == ["a", "c", "d"]


def test_a_long_prompt_is_chunked_while_the_running_rows_keep_decoding() -> None:
    scheduler = _scheduler(_seq("r1", 10), _seq("r2", 10), max_running=8, max_num_batched_tokens=64)
    _step(scheduler)
    scheduler.add(_seq("long", 150))
    plans = [_step(scheduler)[0] for _ in range(3)]
    # Each step: one token per decoding row, the other 62 for the long prompt, until it is done.
    assert [_chunks(plan) for plan in plans] == [[("long", 0, 62)], [("long", 62, 124)], [("long", 124, 150)]]
    assert all(_ids(plan.decodes) == ["r1", "r2"] for plan in plans)
    assert scheduler.prefilling == [] and _ids(scheduler.running) == ["r1", "r2", "long"]
    assert scheduler.running[2].num_computed_tokens == 150
    assert _ids(_step(scheduler)[0].decodes) == ["r1", "r2", "long"]


def test_while_requests_wait_a_long_prompt_takes_half_the_prompt_tokens() -> None:
    scheduler = _scheduler(_seq("r1", 10), _seq("r2", 10), max_running=8, max_num_batched_tokens=64)
    _step(scheduler)
    scheduler.add(_seq("long", 150))
    scheduler.add(_seq("short", 20))
    plan = _step(scheduler)[0]
    # 31 of the 62 prompt tokens start the long prompt, the short one comes whole, the 11 left go to the long one.
    assert _chunks(plan) == [("long", 0, 42), ("short", 0, 20)]
    scheduler.add(_seq("s2", 25))
    scheduler.add(_seq("s3", 10))
    plan = _step(scheduler)[0]
    # Three decoding rows leave 61: 30 for the long prompt, s2 whole, s3 (10 > 6 left) waits, the 6 to the long one.
    assert _chunks(plan) == [("long", 42, 78), ("s2", 0, 25)] and plan.num_batched_tokens == 64
    assert all(plan.num_batched_tokens <= 64 for plan in [_step(scheduler)[0] for _ in range(4)])
    assert _ids(scheduler.running) == ["r1", "r2", "short", "s2", "s3", "long"]


def test_a_prompt_that_fits_in_a_chunk_waits_for_room_instead_of_being_split() -> None:
    scheduler = _scheduler(_seq("r", 3), max_running=8, max_num_batched_tokens=64)
    _step(scheduler)
    for name, length in (("a", 40), ("b", 40), ("c", 10)):
        scheduler.add(_seq(name, length))
    plan, _, _ = _step(scheduler)
    assert _chunks(plan) == [("a", 0, 40)]  # b would need 40 of the 23 left; c waits behind it (queue order)
    plan, _, _ = _step(scheduler)
    assert _chunks(plan) == [("b", 0, 40), ("c", 0, 10)] and _ids(plan.decodes) == ["r", "a"]


def test_an_idle_engine_prefills_a_burst_in_bigger_steps() -> None:
    burst = [_seq(f"p{i}", 100) for i in range(6)]
    scheduler = _scheduler(*burst, _seq("long", 300), _seq("late", 200), max_running=16, max_num_batched_tokens=128)
    plan = _step(scheduler)[0]
    # No row decodes, so no stream stalls: up to 8 budgets of prompts (1024 tokens) in one step, all whole.
    assert _chunks(plan) == [*((f"p{i}", 0, 100) for i in range(6)), ("long", 0, 300)]
    plan = _step(scheduler)[0]
    assert _ids(plan.decodes) == [*(f"p{i}" for i in range(6)), "long"]
    assert _chunks(plan) == [("late", 0, 121)]  # rows decode now: the plain budget, and chunks


def test_clients_are_served_round_robin_so_a_burst_cannot_starve_others() -> None:
    scheduler = _scheduler(max_running=4)
    for i in range(10):
        scheduler.add(_seq(f"a{i}", 3, client_id="burst"))
    for name in ("b0", "b1"):
        scheduler.add(_seq(name, 3, client_id="polite"))
    scheduler.add(_seq("c0", 3, client_id="other"))
    assert _ids(_step(scheduler, stops={"a0": StopCode.EOS_TOKEN, "c0": StopCode.EOS_TOKEN})[0].admitted) == [
        "a0",
        "b0",
        "c0",
        "a1",
    ]
    assert _ids(_step(scheduler)[0].admitted) == ["b1", "a2"]
    assert len(scheduler.waiting) == 7


def test_guided_requests_count_two_rows() -> None:
    guided = [_seq(name, 3) for name in "gh"]
    for seq in guided:
        seq.companion = Sequence(f"{seq.request_id}/unconditional", [1], GenerationParameters(), is_companion=True)
    scheduler = _scheduler(_seq("p", 3), *guided, _seq("q", 3), max_running=4)
    plan, _, _ = _step(scheduler)
    assert _ids(plan.admitted) == ["p", "g"] and scheduler.num_slots == 3  # h would need rows 4 and 5


def test_out_of_memory_requeues_the_step_shrinks_the_row_limit_and_regrows_it() -> None:
    scheduler = _scheduler(*(_seq(name, 3) for name in "abc"), max_running=8)
    _step(scheduler)
    scheduler.add(_seq("d", 3))
    scheduler.add(_seq("e", 3))
    plan, _ = scheduler.schedule(0.0)
    assert _ids(plan.admitted) == ["d", "e"]
    released, events = scheduler.recover_from_out_of_memory(plan)
    assert released == [] and events == []  # the runner dropped d and e itself
    assert scheduler.row_limit == 3 and len(scheduler.waiting) == 2
    plan, _, _ = _step(scheduler)
    assert not plan.admitted and _ids(plan.decodes) == ["a", "b", "c"]  # d and e wait: no free row
    # A decode-only step that runs out of memory preempts the newest running request.
    scheduler.running[2].start_time = 5.0
    plan, _ = scheduler.schedule(0.0)
    released, _ = scheduler.recover_from_out_of_memory(plan)
    assert _ids(released) == ["c"] and scheduler.row_limit == 2 and len(scheduler.waiting) == 3
    for _ in range(STEPS_TO_REGROW_ONE_ROW):
        _step(scheduler)
    assert scheduler.row_limit == 3


def test_a_lone_request_that_does_not_fit_in_memory_fails() -> None:
    scheduler = _scheduler(_seq("big", 3))
    plan, _ = scheduler.schedule(0.0)
    _, events = scheduler.recover_from_out_of_memory(plan)
    assert [event.request_id for event in events] == ["big"] and "out of memory" in events[0].error
    assert not scheduler.prefilling and not scheduler.running and len(scheduler.waiting) == 0


def test_interactive_requests_preempt_batch_rows_which_resume_from_scratch() -> None:
    batch = [_seq(f"b{i}", 3, priority=Priority.BATCH) for i in range(2)]
    scheduler = _scheduler(*batch, max_running=2)
    _step(scheduler)
    batch[1].start_time = 1.0  # the newer one yields
    scheduler.add(_seq("i0", 3))
    plan, _, _ = _step(scheduler)
    assert _ids(plan.preempted) == ["b1"] and _ids(plan.released) == ["b1"]
    assert _ids(plan.admitted) == ["i0"] and _ids(plan.decodes) == ["b0"]
    assert batch[1].num_computed_tokens == 0 and batch[1].generated_ids == [7]  # kept: recomputed on return
    assert _ids(scheduler.waiting.pop_while(lambda seq: True)) == ["b1"]


def test_cancels_reach_waiting_prefilling_and_running_requests_and_expired_ones_are_dropped() -> None:
    scheduler = _scheduler(_seq("run", 3), max_running=4, max_num_batched_tokens=16)
    _step(scheduler)
    scheduler.add(_seq("long", 100))
    _step(scheduler)
    scheduler.add(_seq("wait", 3))
    scheduler.add(_seq("late", 3, deadline=5.0))
    for request_id in ("run", "long", "wait", "nobody"):
        scheduler.cancel(request_id)
    plan, events = scheduler.schedule(now=10.0)
    assert sorted(_ids(plan.released)) == ["long", "run"]  # rows to free; "wait" held none
    assert {event.request_id: event.finish_reason for event in events} == {
        "run": FinishReason.CANCELLED,
        "long": FinishReason.CANCELLED,
        "wait": FinishReason.CANCELLED,
        "late": FinishReason.TIME_LIMIT,
    }
    assert not plan.has_work and scheduler.num_slots == 0


def test_update_decides_every_finish() -> None:
    timed = _seq("timed", 3)
    timed.params = GenerationParameters(max_new_tokens=50, max_time=1.0)
    seqs = [_seq("eos", 3), _seq("length", 3), _seq("broken", 3), timed, _seq("deadline", 3)]
    seqs[-1].options = RequestOptions(request_id="deadline", deadline=20.0, partial_on_deadline=True)
    scheduler = _scheduler(*seqs, max_running=8)
    _step(scheduler)
    plan, _ = scheduler.schedule(now=10.0)
    output = _output(plan, stops={"eos": StopCode.EOS_TOKEN, "length": StopCode.LENGTH}, errors={"broken": "boom"})
    events, ended = scheduler.update(plan, output, now=19.5, deadline_margin=1.0)
    finishes = {seq.request_id: seq.finish_reason for seq in ended}
    assert finishes == {
        "eos": FinishReason.EOS_TOKEN,
        "length": FinishReason.LENGTH,
        "broken": FinishReason.CANCELLED,
        "timed": FinishReason.TIME_LIMIT,
        "deadline": FinishReason.TIME_LIMIT,
    }
    assert [event.error for event in events if event.request_id == "broken"] == ["boom"]
    assert scheduler.running == [] and seqs[0].generated_ids == [7, 7]


def test_speculation_is_planned_only_for_small_batches() -> None:
    scheduler = _scheduler(*(_seq(f"r{i}", 3) for i in range(3)), max_running=8, speculation_max_rows=2)
    _step(scheduler)
    assert not _step(scheduler)[0].speculate
    scheduler.cancel("r0")
    assert _step(scheduler)[0].speculate


def test_the_budget_must_leave_room_for_a_prompt_chunk() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_running=64, max_num_batched_tokens=64)


def test_the_scheduler_needs_no_torch() -> None:
    probe = "import sys, genserve.scheduler.core.scheduler; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
