"""Classifier-free guidance: the unconditional branch runs as a companion row, and outputs equal HF generate()."""

from __future__ import annotations

import grpc
import pytest
import torch

from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import TINY_EOS, StepDriver, hf_generate
from tests.serving import ServerThread, ids_request


def hf_guided(model: torch.nn.Module, prompt: list[int], max_new_tokens: int, scale: float, negative=None, **kw):
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": TINY_EOS, "pad_token_id": 0, **kw}
    if negative is not None:
        kwargs["negative_prompt_ids"] = torch.tensor([negative])
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), guidance_scale=scale, **kwargs)
    return output[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def server(tiny):
    running = ServerThread(tiny, max_running=10)
    yield running
    running.close()


def _guided(prompt: list[int], scale: float, negative: list[int] | None, **parameters: object) -> pb.GenerateRequest:
    request = ids_request(prompt, guidance_scale=scale, **parameters)
    if negative is not None:
        request.negative_input_ids.ids.extend(negative)
    return request


def test_guided_greedy_equals_hf_generate_in_a_mixed_batch(server, tiny) -> None:
    cases = [
        ([10, 11, 12, 13], 1.5, [20, 21]),
        ([30, 31], 3.0, [40, 41, 42, 43, 44, 45]),
        ([50, 51, 52], 2.0, None),  # without a negative prompt: the prompt's last token, as in generate()
        ([60, 61, 62, 63, 64], 0.5, [70]),
    ]
    plain_prompt = [80, 81, 82]
    plain = [server.stub.Generate.future(ids_request(plain_prompt, max_new_tokens=24)) for _ in range(2)]
    guided = [server.stub.Generate.future(_guided(p, s, n, max_new_tokens=24)) for p, s, n in cases]
    for (prompt, scale, negative), future in zip(cases, guided):
        expected = hf_guided(tiny.model, prompt, 24, scale, negative)
        assert list(future.result(timeout=60).token_ids) == expected, (prompt, scale)
    unguided = hf_generate(tiny.model, plain_prompt, server.engine.make_parameters(max_new_tokens=24))
    assert all(list(future.result(timeout=60).token_ids) == unguided for future in plain)
    # Guidance changes the output (else the test proves nothing).
    assert hf_guided(tiny.model, *cases[1][:1], 24, 3.0, cases[1][2]) != hf_generate(
        tiny.model, cases[1][0], server.engine.make_parameters(max_new_tokens=24)
    )
    assert server.engine.runner.num_slots == 0


def test_guided_rows_joining_mid_flight_with_processors(tiny) -> None:
    """Staggered arrivals, guidance with a repetition penalty and with sampling (seeded, like manual_seed)."""
    driver = StepDriver(tiny, max_running=8)
    schedule = {
        0: [("plain", [5, 6, 7], dict(max_new_tokens=30))],
        3: [("guided", [8, 9, 10], dict(max_new_tokens=20, guidance_scale=2.0, repetition_penalty=1.3))],
        7: [("sampled", [11, 12], dict(max_new_tokens=15, guidance_scale=1.7, do_sample=True, seed=5, top_k=20))],
    }
    driver.run(schedule)
    assert driver.tokens["guided"] == hf_guided(tiny.model, [8, 9, 10], 20, 2.0, repetition_penalty=1.3)
    torch.manual_seed(5)
    expected = hf_guided(tiny.model, [11, 12], 15, 1.7, do_sample=True, top_k=20)
    assert driver.tokens["sampled"] == expected
    params = driver.engine.make_parameters(max_new_tokens=30)
    assert driver.tokens["plain"] == hf_generate(tiny.model, [5, 6, 7], params)


def test_a_guided_request_takes_two_rows(tiny) -> None:
    driver = StepDriver(tiny, max_running=3)
    for name in ("a", "b"):
        driver.submit(name, [5, 6], max_new_tokens=4, guidance_scale=2.0)
    driver.engine.step()
    assert driver.engine.num_running == 1 and driver.engine.runner.num_slots == 2
    driver.run()
    assert len(driver.tokens["a"]) == len(driver.tokens["b"]) == 4


def test_bad_negative_prompt_is_invalid_argument(server) -> None:
    for request, field in [
        (_guided([5, 6], 2.0, [5, 9999], max_new_tokens=3), "negative_prompt"),
        (_guided([5, 6], -1.0, None, max_new_tokens=3), "guidance_scale"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Generate(request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(field), error.value.details()
