"""Drives genserve with the TGIS stubs shipped in `caikit-tgis-backend` (run by tests in .venv-clients); prints
one JSON object.

Usage: tgis_client.py TARGET SCENARIO_JSON.
"""

import importlib.util
import json
import sys
from pathlib import Path

import grpc

# The stubs import each other as top-level modules (as caikit's own package does); importing the package itself
# would pull in caikit, which these checks do not need.
STUBS = Path(importlib.util.find_spec("caikit_tgis_backend").submodule_search_locations[0]) / "protobufs"
sys.path.insert(0, str(STUBS))
import generation_pb2 as tgis  # noqa: E402
import generation_pb2_grpc  # noqa: E402


def adapter_report(stub, greedy, scenario: dict) -> dict:  # noqa: ANN001
    """Generate and GenerateStream naming a LoRA adapter with `adapter_id`, and an adapter the server lacks."""
    prompts, adapter = scenario["prompts"], scenario["adapter"]
    batch = stub.Generate(
        tgis.BatchedGenerationRequest(
            adapter_id=adapter, requests=[tgis.GenerationRequest(text=p) for p in prompts], params=greedy
        )
    )
    single = tgis.SingleGenerationRequest(adapter_id=adapter, request=tgis.GenerationRequest(text=prompts[0]))
    single.params.CopyFrom(greedy)
    report = {
        "batch": [r.text for r in batch.responses],
        "stream": "".join(message.text for message in stub.GenerateStream(single)),
    }
    single.adapter_id = "no-such-adapter"
    try:
        list(stub.GenerateStream(single))
        report["unknown"] = "OK"
    except grpc.RpcError as error:
        report["unknown"] = [error.code().name, error.details()]
    return report


def main() -> None:
    target, scenario = sys.argv[1], json.loads(sys.argv[2])
    stub = generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(target))
    greedy = tgis.Parameters(
        method=tgis.GREEDY, stopping=tgis.StoppingCriteria(max_new_tokens=scenario["max_new_tokens"])
    )
    if "adapter" in scenario:
        print(json.dumps(adapter_report(stub, greedy, scenario)))
        return
    prompts = scenario["prompts"]
    batch = stub.Generate(
        tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=p) for p in prompts], params=greedy)
    )
    report: dict = {
        "batch": [r.text for r in batch.responses],
        "batch_counts": [[r.input_token_count, r.generated_token_count] for r in batch.responses],
        "batch_stop_reasons": [tgis.StopReason.Name(r.stop_reason) for r in batch.responses],
    }
    stream = list(
        stub.GenerateStream(
            tgis.SingleGenerationRequest(request=tgis.GenerationRequest(text=prompts[0]), params=greedy)
        )
    )
    report["stream_text"] = "".join(message.text for message in stream)
    report["stream_first_input_tokens"] = stream[0].input_token_count
    report["stream_final_stop_reason"] = tgis.StopReason.Name(stream[-1].stop_reason)
    report["stream_messages"] = len(stream)

    stop = scenario["stop_sequence"]
    stopped = tgis.Parameters()
    stopped.CopyFrom(greedy)
    stopped.stopping.stop_sequences.append(stop)
    response = stub.Generate(
        tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=prompts[0])], params=stopped)
    ).responses[0]
    report["stop"] = {
        "text": response.text,
        "reason": tgis.StopReason.Name(response.stop_reason),
        "sequence": response.stop_sequence,
    }

    choice = tgis.Parameters()
    choice.CopyFrom(greedy)
    choice.decoding.choice.choices.extend(scenario["choices"])
    response = stub.Generate(
        tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=prompts[1])], params=choice)
    ).responses[0]
    report["choice"] = response.text

    sampled = tgis.Parameters(
        method=tgis.SAMPLE,
        sampling=tgis.SamplingParameters(temperature=0.8, top_k=20),
        stopping=tgis.StoppingCriteria(max_new_tokens=8, min_new_tokens=8),  # a random seed may draw eos early
        response=tgis.ResponseOptions(generated_tokens=True, token_logprobs=True, token_ranks=True, top_n_tokens=2),
    )
    response = stub.Generate(
        tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=prompts[2])], params=sampled)
    ).responses[0]
    report["sampled"] = {
        "seed": response.seed,
        "tokens": len(response.tokens),
        "ranks": [token.rank for token in response.tokens],
        "top_tokens": [len(token.top_tokens) for token in response.tokens],
        "logprobs_negative": all(token.logprob <= 0 for token in response.tokens),
    }

    tokenized = stub.Tokenize(
        tgis.BatchedTokenizeRequest(requests=[tgis.TokenizeRequest(text=p) for p in prompts], return_tokens=True)
    )
    report["token_counts"] = [r.token_count for r in tokenized.responses]
    info = stub.ModelInfo(tgis.ModelInfoRequest())
    report["model_info"] = [tgis.ModelInfoResponse.ModelKind.Name(info.model_kind), info.max_sequence_length]

    bad = tgis.Parameters()
    bad.CopyFrom(greedy)
    bad.response.top_n_tokens = 9
    try:
        stub.Generate(tgis.BatchedGenerationRequest(requests=[tgis.GenerationRequest(text=prompts[0])], params=bad))
        report["bad"] = "OK"
    except grpc.RpcError as error:
        report["bad"] = [error.code().name, error.details()]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
