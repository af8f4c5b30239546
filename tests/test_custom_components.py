"""Registered custom processors and stopping criteria run only on the rows that enabled them."""

from __future__ import annotations

import json

import grpc
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from genserve.scheduler.features.custom_examples import BannedPhrasesLogitsProcessor, MaxSentencesCriteria
from genserve.scheduler.features.plugins import PluginRegistry
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.conftest import hf_generate
from tests.serving import ServerThread, ids_request


class ExplodingProcessor(LogitsProcessor):
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def server(tiny):
    registry = PluginRegistry(
        logits_processors={"ban": BannedPhrasesLogitsProcessor, "explode": ExplodingProcessor},
        stopping_criteria={"sentences": MaxSentencesCriteria},
    )
    running = ServerThread(tiny, plugins=registry, max_running=6)
    yield running
    running.close()


def _with(request: pb.GenerateRequest, kind: str, name: str, **kwargs: object) -> pb.GenerateRequest:
    getattr(request, kind).append(pb.CustomComponent(name=name, json_args=json.dumps(kwargs)))
    return request


def test_processor_changes_only_its_row_and_matches_generate_with_it(server, tiny) -> None:
    prompt = [40, 41, 42]
    params = server.engine.make_parameters(max_new_tokens=25)
    plain_expected = hf_generate(tiny.model, prompt, params)
    phrases = [[plain_expected[2]], plain_expected[5:7]]
    plain = server.stub.Generate.future(ids_request(prompt, max_new_tokens=25))
    banned = server.stub.Generate(
        _with(ids_request(prompt, max_new_tokens=25), "logits_processors", "ban", phrases=phrases)
    )
    assert list(plain.result(timeout=30).token_ids) == plain_expected
    with torch.inference_mode():
        reference = tiny.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=25,
            do_sample=False,
            eos_token_id=list(params.eos_token_id),
            pad_token_id=0,
            logits_processor=LogitsProcessorList([BannedPhrasesLogitsProcessor(phrases)]),
        )[0, len(prompt) :].tolist()
    assert list(banned.token_ids) == reference != plain_expected
    assert plain_expected[2] not in banned.token_ids


def test_stopping_criterion_ends_its_row_with_its_own_reason(server, tiny) -> None:
    prompt = [50, 51]
    params = server.engine.make_parameters(max_new_tokens=30)
    expected = hf_generate(tiny.model, prompt, params)
    end_token = expected[7]
    request = _with(
        ids_request(prompt, max_new_tokens=30),
        "stopping_criteria",
        "sentences",
        max_sentences=1,
        sentence_end_ids=[end_token],
    )
    response = server.stub.Generate(request)
    assert response.finish_reason == pb.STOPPING_CRITERIA
    assert list(response.token_ids) == expected[: expected.index(end_token) + 1]
    with torch.inference_mode():
        criterion = StoppingCriteriaList([MaxSentencesCriteria(1, [end_token])])
        reference = tiny.model.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0, stopping_criteria=criterion
        )[0, len(prompt) :].tolist()
    assert list(response.token_ids) == reference


@pytest.mark.parametrize(
    ("kind", "name", "kwargs", "field"),
    [
        ("logits_processors", "nope", {}, "logits_processors[0]"),
        ("logits_processors", "ban", {"phrases": []}, "logits_processors[0]"),
        ("stopping_criteria", "sentences", {"wrong": 1}, "stopping_criteria[0]"),
    ],
)
def test_unknown_names_and_bad_arguments_are_invalid(server, kind: str, name: str, kwargs: dict, field: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(_with(ids_request([5, 6], max_new_tokens=3), kind, name, **kwargs))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in error.value.details()


def test_a_failing_processor_fails_only_its_request(server, tiny) -> None:
    prompts = [[60 + i, 61] for i in range(4)]
    mates = [server.stub.Generate.future(ids_request(p, max_new_tokens=20)) for p in prompts]
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(_with(ids_request([70, 71], max_new_tokens=20), "logits_processors", "explode"))
    assert error.value.code() == grpc.StatusCode.INTERNAL and "boom" in error.value.details()
    for prompt, mate in zip(prompts, mates):
        expected = hf_generate(tiny.model, prompt, server.engine.make_parameters(max_new_tokens=20))
        assert list(mate.result(timeout=30).token_ids) == expected


def test_n_samples_differ_and_each_is_reproducible_by_its_seed(server) -> None:
    request = ids_request([80, 81, 82], max_new_tokens=15, do_sample=True, temperature=1.5, seed=7)
    request.num_return_sequences = 4
    response = server.stub.Generate(request)
    samples = [list(choice.token_ids) for choice in response.choices]
    assert [c.index for c in response.choices] == [0, 1, 2, 3] and len({tuple(s) for s in samples}) == 4
    assert list(response.token_ids) == samples[0]
    assert response.usage.generated_tokens == sum(len(s) for s in samples)
    for index, sample in enumerate(samples):
        alone = ids_request([80, 81, 82], max_new_tokens=15, do_sample=True, temperature=1.5, seed=7 + index)
        assert list(server.stub.Generate(alone).token_ids) == sample
    streamed: dict[int, list[int]] = {}
    for chunk in server.stub.GenerateStream(request):
        streamed.setdefault(chunk.index, []).extend(chunk.token_ids)
    assert [streamed[i] for i in range(4)] == samples
    request.num_return_sequences = 17
    with pytest.raises(grpc.RpcError) as error:
        server.stub.Generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "num_return_sequences" in error.value.details()


def test_identical_prompts_admitted_together_share_one_prefill(tiny, monkeypatch) -> None:
    from tests.conftest import StepDriver

    driver = StepDriver(tiny, max_running=4)
    runner = driver.engine.runner
    original, prefills = runner.model.get_decoder().forward, []

    def counting(input_ids, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if input_ids.shape[1] > 1:
            prefills.append(input_ids.shape[1])
        return original(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(runner.model.get_decoder(), "forward", counting)
    prompt = [90, 91, 92, 93]
    for index in range(3):
        driver.submit(f"s{index}", prompt, max_new_tokens=12)
    driver.run()
    assert prefills == [len(prompt)]
    expected = hf_generate(tiny.model, prompt, driver.engine.make_parameters(max_new_tokens=12))
    assert all(driver.tokens[f"s{index}"] == expected for index in range(3))
