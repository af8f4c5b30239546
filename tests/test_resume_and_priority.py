"""Resumable streams and request priorities, through real gRPC channels."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.params import GenerationParameters
from genserve.scheduler.core.request import FinishReason, Priority, RequestOptions, Sequence
from genserve.scheduler.core.scheduler import Scheduler
from genserve.service.cli.main import main
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from genserve.service.server import ServerOptions
from tests.conftest import StepDriver, hf_generate
from tests.serving import LONG_CONTEXT, LONG_REQUEST_TOKENS, ServerThread, ids_request, wait_for


@pytest.fixture
def server(tiny):
    running = ServerThread(
        tiny,
        options=ServerOptions(port=0, stream_retention_seconds=0.5),
        max_running=4,
        max_queue=64,
        max_context=LONG_CONTEXT,
    )
    yield running
    running.close()


def test_stream_cut_and_resumed_yields_exactly_the_uninterrupted_tokens(server, tiny) -> None:
    prompt = [21, 22, 23, 24]
    expected = hf_generate(tiny.model, prompt, server.engine.make_parameters(max_new_tokens=80))
    request = ids_request(prompt, "resume-me", max_new_tokens=80)
    request.resumable = True
    stream = server.stub.GenerateStream(request)
    first = [next(stream) for _ in range(10)]
    stream.cancel()  # the connection drops
    received = [t for chunk in first for t in chunk.token_ids]
    assert [c.token_offset for c in first] == list(range(10))
    prefilled = server.engine.num_prefilled
    resume = pb.GenerateRequest(request_id="resume-me", resume_from_token=len(received), return_token_ids=True)
    rest = list(server.stub.GenerateStream(resume))
    assert rest[0].token_offset == len(received)
    assert received + [t for chunk in rest for t in chunk.token_ids] == expected
    assert rest[-1].finish_reason in (pb.LENGTH, pb.EOS_TOKEN)
    assert server.engine.num_prefilled == prefilled  # nothing was recomputed
    # Resuming again, from anywhere, replays the same tokens while the stream is retained.
    again = server.stub.GenerateStream(
        pb.GenerateRequest(request_id="resume-me", resume_from_token=5, return_token_ids=True)
    )
    assert [t for chunk in again for t in chunk.token_ids] == expected[5:]


def test_unknown_and_expired_streams_are_not_found(server) -> None:
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub.GenerateStream(pb.GenerateRequest(request_id="never", resume_from_token=0)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    request = ids_request([5, 6], "short-lived", max_new_tokens=3)
    request.resumable = True
    list(server.stub.GenerateStream(request))
    time.sleep(0.8)  # past the 0.5 s retention
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub.GenerateStream(pb.GenerateRequest(request_id="short-lived", resume_from_token=1)))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_abandoned_resumable_stream_is_cancelled_after_retention(server) -> None:
    request = ids_request([5, 6], "abandoned", max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
    request.resumable = True
    stream = server.stub.GenerateStream(request)
    next(stream)
    stream.cancel()
    assert server.engine.num_running == 1  # still generating for the client to come back
    assert wait_for(lambda: server.engine.num_running == 0, timeout=60)
    # Cancelled when the retention ran out, not finished: a request left to run would end LENGTH.
    assert server.engine_finishes["abandoned"] is FinishReason.CANCELLED
    assert server.engine_tokens["abandoned"] < LONG_REQUEST_TOKENS


def test_resumable_needs_a_request_id(server) -> None:
    request = ids_request([5, 6], max_new_tokens=3)
    request.resumable = True
    with pytest.raises(grpc.RpcError) as error:
        list(server.stub.GenerateStream(request))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in error.value.details()


def test_interactive_requests_are_admitted_before_batch_ones() -> None:
    scheduler = Scheduler(EngineConfig(max_running=3))
    for i in range(3):
        options = RequestOptions(priority=Priority.BATCH)
        scheduler.add(Sequence(f"b{i}", [1, 2], GenerationParameters(), options=options))
    scheduler.add(Sequence("i0", [1, 2], GenerationParameters()))
    plan, _ = scheduler.schedule(0.0)
    assert [s.request_id for s in plan.admitted] == ["i0", "b0", "b1"]
    assert scheduler.waiting.count_at(Priority.BATCH) == 1


def test_interactive_request_preempts_a_batch_row_which_resumes_without_loss(tiny) -> None:
    driver = StepDriver(tiny, max_running=2)
    prompts = {"b0": [5, 6, 7], "b1": [8, 9, 10]}
    for request_id, prompt in prompts.items():
        params = driver.engine.make_parameters(max_new_tokens=40)
        driver.engine.submit(prompt, params, RequestOptions(request_id=request_id, priority=Priority.BATCH))
    for _ in range(5):
        driver.engine.step()
    driver.submit("i0", [11, 12], max_new_tokens=10)
    driver.engine.step()
    rows = {seq.request_id for seq in driver.engine.runner.rows}
    assert "i0" in rows and len(rows) == 2  # one batch row yielded its place at once
    driver.run()
    assert len(driver.tokens["i0"]) == 10
    for request_id, prompt in prompts.items():
        expected = hf_generate(tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=40))
        assert driver.tokens[request_id] == expected  # the preempted row lost nothing


def test_loadtest_reports_interactive_ttft_better_with_priorities(tiny, tmp_path: Path) -> None:
    server = ServerThread(tiny, max_running=2, max_queue=256)
    try:
        # 90% batch requests in one burst; long enough that queueing on the server, not the client's sending,
        # decides TTFT.
        workload = "--num-requests 40 --arrival burst --batch-fraction 0.9 --prompt-mode ids --max-new-tokens 80,120"
        code = main(
            [
                "loadtest",
                "--target",
                server.target,
                *workload.split(),
                "--compare-priorities",
                "--output",
                str(tmp_path),
            ]
        )
    finally:
        server.close()
    assert code == 0
    comparison = json.loads((tmp_path / "loadtest.json").read_text())["priority_comparison"]
    # An order, not a figure: interactive requests reach their first token sooner when they may skip the batch
    # ones (the README's load-testing section gives measured ratios).
    assert comparison["ratio"]["p99"] > 1, comparison
