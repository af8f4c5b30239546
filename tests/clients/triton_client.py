"""Drives genserve with the real `tritonclient.grpc` (run by tests in .venv-clients); prints one JSON object.

Usage: triton_client.py TARGET MODEL SCENARIO_JSON, where the scenario names the prompts, the sampling parameters
and the checks to run: metadata, unary, interleaved streams, and a cancelled stream.
"""

import json
import queue
import sys
import time

import numpy as np
import tritonclient.grpc as grpcclient


def inputs(prompt: str, stream: bool, sampling: dict, exclude_input: bool) -> list:
    tensors = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("stream", [1], "BOOL")]
    tensors[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    tensors[1].set_data_from_numpy(np.array([stream], dtype=bool))
    for name, value in (("sampling_parameters", json.dumps(sampling)), ("exclude_input_in_output", exclude_input)):
        is_text = isinstance(value, str)
        tensor = grpcclient.InferInput(name, [1], "BYTES" if is_text else "BOOL")
        tensor.set_data_from_numpy(
            np.array([value.encode()] if is_text else [value], dtype=np.object_ if is_text else bool)
        )
        tensors.append(tensor)
    return tensors


def text_of(result) -> str:  # noqa: ANN001
    output = result.as_numpy("text_output")
    return output[0].decode() if output is not None else ""


def adapter_report(client, model: str, scenario: dict) -> dict:  # noqa: ANN001
    """Unary and streamed requests naming a LoRA adapter with `lora_name`, as Triton's vLLM backend takes it."""
    sampling = dict(scenario["sampling"], lora_name=scenario["adapter"])
    report = {"unary": [text_of(client.infer(model, inputs(p, False, sampling, True))) for p in scenario["prompts"]]}
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, inputs(scenario["prompts"][0], True, sampling, True), request_id="a")
    parts, final = [], False
    while not final:
        result, error = responses.get(timeout=120)
        if error is not None:
            raise SystemExit(f"stream error: {error}")
        parts.append(text_of(result))
        final = result.get_response().parameters["triton_final_response"].bool_param
    client.stop_stream()
    report["streamed"] = "".join(parts)
    try:
        client.infer(model, inputs(scenario["prompts"][0], False, dict(sampling, lora_name="no-such-adapter"), True))
        report["unknown"] = "OK"
    except Exception as error:  # noqa: BLE001 - tritonclient raises InferenceServerException
        report["unknown"] = [error.status(), error.message()]
    return report


def main() -> None:
    target, model, scenario = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = grpcclient.InferenceServerClient(url=target)
    if "adapter" in scenario:
        print(json.dumps(adapter_report(client, model, scenario)))
        return
    report: dict = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server_name": client.get_server_metadata(as_json=True)["name"],
        "model_inputs": [t["name"] for t in client.get_model_metadata(model, as_json=True)["inputs"]],
    }
    sampling = scenario["sampling"]
    report["unary"] = []
    for prompt in scenario["prompts"]:
        result = client.infer(model, inputs(prompt, False, sampling, exclude_input=True))
        report["unary"].append(text_of(result))
    with_prompt = client.infer(model, inputs(scenario["prompts"][0], False, sampling, exclude_input=False))
    report["unary_with_prompt"] = text_of(with_prompt)
    extra = inputs(scenario["prompts"][0], False, sampling, exclude_input=True)
    for name in ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"):
        flag = grpcclient.InferInput(name, [1], "BOOL")
        flag.set_data_from_numpy(np.array([True], dtype=bool))
        extra.append(flag)
    result = client.infer(model, extra)
    report["finish_reason"] = result.as_numpy("finish_reason")[0].decode()
    report["num_input_tokens"] = int(result.as_numpy("num_input_tokens")[0])
    report["num_output_tokens"] = int(result.as_numpy("num_output_tokens")[0])

    # Two prompts interleaved on one stream, each answered by text deltas and a final response.
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for index, prompt in enumerate(scenario["prompts"][:2]):
        client.async_stream_infer(model, inputs(prompt, True, sampling, exclude_input=True), request_id=f"s{index}")
    streamed: dict = {"s0": [], "s1": []}
    finals: dict = {"s0": 0, "s1": 0}
    order = []
    while sum(finals.values()) < 2:
        result, error = responses.get(timeout=120)
        if error is not None:
            raise SystemExit(f"stream error: {error}")
        response = result.get_response()
        streamed[response.id].append(text_of(result))
        order.append(response.id)
        finals[response.id] += int(response.parameters["triton_final_response"].bool_param)
    client.stop_stream()
    report["streamed"] = {key: "".join(parts) for key, parts in streamed.items()}
    report["stream_messages"] = {key: len(parts) for key, parts in streamed.items()}
    report["finals"] = finals
    report["interleaved"] = order != sorted(order)

    # A long stream cancelled mid-generation.
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    long = dict(sampling, max_tokens=scenario["long_tokens"], ignore_eos=True)
    client.async_stream_infer(model, inputs(scenario["prompts"][0], True, long, exclude_input=True), request_id="c")
    received = 0
    while received < 3:
        responses.get(timeout=120)
        received += 1
    client.stop_stream(cancel_requests=True)
    time.sleep(0.2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
