"""LoRA adapters per request: rows of different adapters and of the base model in one continuous batch, each equal
to PEFT's own `PeftModel.from_pretrained(base, adapter).generate()` on that request alone."""

from __future__ import annotations

import copy
import random
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.core.errors import AdapterError
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.loader import LoadedModel
from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
from tests.architectures import SERVED, VOCAB, Case, tiny_config
from tests.conftest import StepDriver
from tests.lora_adapters import MAX_NEW_TOKENS, peft_generate, save_adapter
from tests.serving import LONG_CONTEXT, LONG_REQUEST_TOKENS, ServerThread, ids_request, wait_for

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# (name, rank, alpha, targets, extra LoraConfig fields): ranks, alphas and targets differ on purpose.
ADAPTERS = [
    ("attn-r4", 4, 8, ATTENTION, {}),
    ("mlp-r8", 8, 4, MLP, {"use_rslora": True}),
    ("all-r2", 2, 16, ATTENTION + MLP, {"rank_pattern": {"down_proj": 6}, "alpha_pattern": {"q_proj": 3}}),
]


def _case(label: str) -> Case:
    return next(case for case in SERVED if case.label == label)


def tiny_base(label: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(_case(label))).eval()


@pytest.fixture(scope="module")
def adapters_of(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - a cached factory
    """label -> (plain base, served copy of it, {adapter name: folder})."""
    made: dict[str, tuple[torch.nn.Module, torch.nn.Module, dict[str, Path]]] = {}

    def make(label: str) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, Path]]:
        if label not in made:
            base = tiny_base(label)
            root = tmp_path_factory.mktemp(f"adapters-{label.replace(' ', '-')}")
            folders = {
                name: save_adapter(base, root / name, rank, alpha, targets, seed=index, **extra)
                for index, (name, rank, alpha, targets, extra) in enumerate(ADAPTERS)
            }
            made[label] = (base, copy.deepcopy(base), folders)
        return made[label]

    return make


def _requests(seed: int, names: list[str]) -> list[tuple[str, list[int], str]]:
    """Eight requests of different lengths, two per adapter and two of the base model: (id, prompt, adapter)."""
    rng = random.Random(seed)
    return [
        (f"r{index}", [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 30))], adapter)
        for index, adapter in enumerate(["", *names] * 2)
    ]


@pytest.mark.parametrize("label", ["Llama", "Qwen3", "Gemma"])
def test_mixed_adapters_over_grpc_equal_peft_generate(adapters_of, label: str) -> None:
    base, served, folders = adapters_of(label)
    requests = _requests(1, list(folders))
    server = ServerThread(
        LoadedModel(model=served, tokenizer=None, name=f"tiny-{label}"),
        max_running=6,  # fewer rows than requests: some join as others leave
        lora_modules=tuple((name, str(folder)) for name, folder in folders.items()),
        kv_cache_memory=4 * 2**20,
        prefix_caching=True,
    )
    try:
        info = server.stub.ModelInfo(pb.ModelInfoRequest())
        assert sorted(info.adapters) == sorted(folders)
        results: dict[str, list[int]] = {}

        def call(request_id: str, prompt: list[int], adapter: str) -> None:
            request = ids_request(prompt, request_id, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
            request.adapter = adapter
            results[request_id] = list(server.stub.Generate(request).token_ids)

        threads = []
        for index, request in enumerate(requests):
            if index == 4:  # the second half joins while the first decodes
                assert wait_for(lambda: sum(server.engine_tokens.values()) > 0)
            threads.append(threading.Thread(target=call, args=request))
            threads[-1].start()
            time.sleep(0.02)
        for thread in threads:
            thread.join(timeout=120)
    finally:
        server.close()
    for request_id, prompt, adapter in requests:
        expected = peft_generate(base, folders[adapter] if adapter else None, prompt)
        assert results[request_id] == expected, (request_id, adapter)
    # The guard: every adapter changes what the base model says, so equality above shows it was applied.
    for _, prompt, adapter in requests:
        if adapter:
            assert peft_generate(base, folders[adapter], prompt) != peft_generate(base, None, prompt), adapter


def test_static_decode_chunked_prefill_and_shared_prompts_stay_exact(adapters_of) -> None:
    """The captured-shape decode path (every row gathers its slot), prompts chunked over steps, and one prompt for
    the base model and each adapter: each adapter's KV is its own (never shared through the prefix cache)."""
    base, served, folders = adapters_of("Llama")
    driver = StepDriver(
        LoadedModel(model=served, tokenizer=None, name="tiny"),
        max_running=4,
        max_num_batched_tokens=12,
        decode_mode="static",
        kv_cache_memory=4 * 2**20,
        prefix_caching=True,
        lora_modules=tuple((name, str(folder)) for name, folder in folders.items()),
    )
    shared = list(range(10, 50))  # longer than a chunk, and than a KV block
    adapters = ["", *folders]
    schedule = {step: [(f"s{step}", shared, dict(options=dict(adapter=adapters[step % 4])))] for step in range(0, 8, 2)}
    for requests in schedule.values():
        requests[0][2].update(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
    driver.run(schedule)
    for ((request_id, prompt, overrides),) in schedule.values():
        adapter = overrides["options"]["adapter"]
        assert driver.tokens[request_id] == peft_generate(base, folders.get(adapter), prompt), adapter


def test_seeded_sampling_with_an_adapter_is_batch_invariant(adapters_of) -> None:
    base, served, folders = adapters_of("Llama")
    loaded = LoadedModel(model=served, tokenizer=None, name="tiny")
    modules = tuple((name, str(folder)) for name, folder in folders.items())
    sampled = dict(do_sample=True, temperature=1.3, top_k=50, seed=7, max_new_tokens=12, ignore_eos=True)
    target = ("target", [7, 8, 9, 10], dict(sampled, options=dict(adapter="mlp-r8")))
    alone = StepDriver(loaded, max_running=4, lora_modules=modules)
    alone.run({0: [target]})
    crowded = StepDriver(loaded, max_running=4, lora_modules=modules)
    others = [
        (f"o{i}", [20 + i] * (3 + i), dict(max_new_tokens=12, options=dict(adapter=a))) for i, a in enumerate(folders)
    ]
    crowded.run({0: others[:2], 2: [target], 3: others[2:]})
    assert crowded.tokens["target"] == alone.tokens["target"]
    base_only = StepDriver(loaded, max_running=4, lora_modules=modules)
    base_only.run({0: [(target[0], target[1], dict(sampled))]})
    assert base_only.tokens["target"] != alone.tokens["target"]  # the adapter is in the draws


def test_at_most_max_loras_adapters_share_a_step_and_the_rest_wait(adapters_of) -> None:
    base, served, folders = adapters_of("Llama")
    driver = StepDriver(
        LoadedModel(model=served, tokenizer=None, name="tiny"),
        max_running=8,
        max_loras=1,
        lora_modules=tuple((name, str(folder)) for name, folder in folders.items()),
    )
    runner, seen = driver.engine.runner, []
    execute = runner.execute

    def counted(plan):  # noqa: ANN001, ANN202
        output = execute(plan)
        seen.append({seq.options.adapter for seq in (*runner.state.rows, *runner.prefilling)} - {""})
        return output

    runner.execute = counted
    requests = _requests(2, list(folders))
    driver.run(
        {
            0: [
                (rid, prompt, dict(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, options=dict(adapter=a)))
                for rid, prompt, a in requests
            ]
        }
    )
    assert max(len(adapters) for adapters in seen) == 1
    assert {adapter for adapters in seen for adapter in adapters} == set(folders)  # every one had its turn
    for request_id, prompt, adapter in requests:
        assert driver.tokens[request_id] == peft_generate(base, folders.get(adapter), prompt), adapter


def test_an_unknown_adapter_is_not_found_and_the_batch_is_unharmed(adapters_of) -> None:
    base, served, folders = adapters_of("Llama")
    name = next(iter(folders))
    server = ServerThread(
        LoadedModel(model=served, tokenizer=None, name="tiny"),
        max_running=4,
        http=True,
        lora_modules=((name, str(folders[name])),),
    )
    try:
        running = ids_request([5, 6, 7], max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)
        running.adapter = name
        future = server.stub.Generate.future(running)
        missing = ids_request([5, 6, 7], max_new_tokens=3)
        missing.adapter = "no-such-adapter"
        with pytest.raises(grpc.RpcError) as error:
            server.stub.Generate(missing)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no-such-adapter" in error.value.details()
        assert list(future.result(timeout=60).token_ids) == peft_generate(base, folders[name], [5, 6, 7])
        # The OpenAI API selects adapters by model name, as vLLM does, and lists them.
        models = httpx.get(f"{server.http_url}/v1/models").json()["data"]
        assert [model["id"] for model in models] == ["tiny", name] and models[1]["parent"] == "tiny"
        body = dict(model=name, prompt=[5, 6, 7], max_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True)
        reply = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60).json()
        assert reply["model"] == name
        unknown = httpx.post(f"{server.http_url}/v1/completions", json=dict(body, model="nope"), timeout=60)
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    finally:
        server.close()


def _refusal(served: torch.nn.Module, folder: Path, **config: object) -> str:
    with pytest.raises(AdapterError) as error:
        Engine(
            LoadedModel(model=served, tokenizer=None, name="tiny"),
            EngineConfig(lora_modules=(("bad", str(folder)),), **config),
        )
    return str(error.value)


def _unservable(base: torch.nn.Module, folders: dict[str, Path], where: Path) -> dict[str, tuple[Path, str]]:
    """Adapter folders the server must refuse, by name: (folder, what the refusal must say)."""
    wider = tiny_config(_case("Llama"))
    wider.hidden_size = 96
    corrupt = where / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((folders["attn-r4"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    prompt_tuning = where / "prompt-tuning"
    get_peft_model(
        copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    ).save_pretrained(prompt_tuning)
    return {
        "too-wide": (folders["mlp-r8"], "rank 8"),
        "head": (save_adapter(base, where / "head", 4, 8, ["q_proj", "lm_head"], seed=1), "lm_head"),
        "embed": (save_adapter(base, where / "embed", 4, 8, ["embed_tokens"], seed=1), "input embeddings"),
        "dora": (save_adapter(base, where / "dora", 4, 8, ["q_proj"], seed=1, use_dora=True), "DoRA"),
        "other": (
            save_adapter(AutoModelForCausalLM.from_config(wider), where / "other", 4, 8, ["q_proj"], seed=1),
            "another base model",
        ),
        "prompt-tuning": (prompt_tuning, "PROMPT_TUNING adapter; only LoRA"),
        "corrupt": (corrupt, "PEFT cannot read"),
    }


def test_adapters_that_cannot_be_served_are_refused_at_start_up_saying_why(adapters_of, tmp_path: Path) -> None:
    base, served, folders = adapters_of("Llama")
    for name, (folder, reason) in _unservable(base, folders, tmp_path).items():
        assert reason in _refusal(served, folder, max_lora_rank=4), name
    assert "adapter_config.json" in _refusal(served, tmp_path / "missing")


def _labelled_samples(server: ServerThread, name: str) -> list[tuple[dict[str, str], float]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name
    ]


def test_metrics_count_per_adapter_and_list_running_and_waiting_adapters(adapters_of) -> None:
    _, served, folders = adapters_of("Llama")
    first, second, _ = folders
    server = ServerThread(
        LoadedModel(model=served, tokenizer=None, name="tiny"),
        metrics=True,
        max_running=4,
        max_loras=1,
        max_context=LONG_CONTEXT,
        lora_modules=tuple((name, str(folder)) for name, folder in folders.items()),
    )
    try:
        assert _labelled_samples(server, "genserve_lora_adapter_load_seconds_count")[0][1] == len(folders)
        done = ids_request([5, 6, 7], max_new_tokens=4, ignore_eos=True)
        done.adapter = first
        assert len(server.stub.Generate(done).token_ids) == 4
        long = ids_request([5, 6, 7], max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
        long.adapter = first
        running = server.stub.Generate.future(long)
        assert wait_for(lambda: server.engine.num_running == 1)
        waiting = ids_request([8, 9], max_new_tokens=3)
        waiting.adapter = second  # one adapter slot: it waits for the first adapter's rows to end
        queued = server.stub.Generate.future(waiting)
        assert wait_for(lambda: server.engine.num_waiting == 1)
        # The series reads the snapshot the engine publishes after each step, so it may lag the queue by a step.
        assert wait_for(lambda: _labelled_samples(server, "genserve_lora_requests_info")[0][0]["waiting_lora_adapters"])
        ((labels, when),) = _labelled_samples(server, "genserve_lora_requests_info")
        assert labels == {"running_lora_adapters": first, "waiting_lora_adapters": second, "max_lora": "1"}
        assert abs(when - time.time()) < 60
        running.cancel()
        assert len(queued.result(timeout=60).token_ids) == 3
        requests = {
            labels["adapter"]: value
            for labels, value in _labelled_samples(server, "genserve_lora_requests_total")
            if labels["code"] == "OK"
        }
        assert requests == {first: 1, second: 1}
        tokens = dict(
            (labels["adapter"], value)
            for labels, value in _labelled_samples(server, "genserve_lora_generated_tokens_total")
        )
        assert tokens[first] >= 4 and tokens[second] == 3
    finally:
        server.close()


def _generate(server: ServerThread, prompt: list[int], adapter: str, **parameters: object) -> list[int]:
    request = ids_request(prompt, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True, **parameters)
    request.adapter = adapter
    return list(server.stub.Generate(request).token_ids)


def _status(call, *arguments: object) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001 - a stub method
    with pytest.raises(grpc.RpcError) as error:
        call(*arguments)
    return error.value.code(), error.value.details()


def test_lora_dir_reads_adapters_on_first_use_and_keeps_requests_inside_it(adapters_of, tmp_path: Path) -> None:
    base, served, folders = adapters_of("Llama")
    lora_dir = tmp_path / "adapters"
    lora_dir.mkdir()
    for name, folder in folders.items():
        (lora_dir / name).symlink_to(folder, target_is_directory=True)  # links to folders outside --lora-dir
    shutil.copytree(folders["attn-r4"], lora_dir / "copied")
    shutil.copytree(folders["attn-r4"], lora_dir / "again")
    (tmp_path / "unservable").mkdir()
    unservable = _unservable(base, folders, tmp_path / "unservable")
    for name, (folder, _) in unservable.items():
        shutil.copytree(folder, lora_dir / name)
    server = ServerThread(
        LoadedModel(model=served, tokenizer=None, name="tiny"),
        max_running=4,
        max_context=LONG_CONTEXT,
        lora_dir=str(lora_dir),
        max_cpu_loras=1,
        max_lora_rank=4,
    )
    try:
        long = ids_request([5, 6, 7], max_new_tokens=LONG_REQUEST_TOKENS, ignore_eos=True)
        running = server.stub.GenerateStream(long)
        next(running)
        prompt = [9, 10, 11, 12]
        expected = peft_generate(base, folders["attn-r4"], prompt)
        assert _generate(server, prompt, "copied") == expected
        # One adapter in host memory (--max-cpu-loras 1): the other is let go, and read again when named again.
        assert _generate(server, prompt, "again") == expected and list(server.engine.adapters) == ["again"]
        assert _generate(server, prompt, "copied") == expected and list(server.engine.adapters) == ["copied"]
        # Symbolic links that lead out of --lora-dir are refused, as is every adapter that cannot be served
        # (start-up's refusals): each fails its own request, FAILED_PRECONDITION saying why.
        refusals = {"attn-r4": "outside"} | {name: reason for name, (_, reason) in unservable.items()}
        for name, reason in refusals.items():
            code, details = _status(_generate, server, prompt, name)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and reason in details, (name, details)
        for name in ("../adapters/copied", "missing", "/etc"):
            code, details = _status(_generate, server, prompt, name)
            assert code == grpc.StatusCode.NOT_FOUND and name in details
        assert list(server.stub.ModelInfo(pb.ModelInfoRequest()).adapters) == ["copied"]
        assert next(running).token_ids  # the long stream is unharmed
        running.cancel()
    finally:
        server.close()


def test_adapters_load_and_unload_while_serving(adapters_of) -> None:
    base, served, folders = adapters_of("Llama")
    server = ServerThread(
        LoadedModel(model=served, tokenizer=None, name="tiny"), max_running=4, http=True, runtime_lora=True
    )
    try:
        prompt = [4, 5, 6]
        loaded = server.stub.LoadAdapter(pb.LoadAdapterRequest(name="live", path=str(folders["all-r2"])))
        assert list(loaded.adapters) == ["live"]
        assert _generate(server, prompt, "live") == peft_generate(base, folders["all-r2"], prompt)
        code, details = _status(
            server.stub.LoadAdapter, pb.LoadAdapterRequest(name="live", path=str(folders["attn-r4"]))
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already" in details
        assert list(server.stub.UnloadAdapter(pb.UnloadAdapterRequest(name="live")).adapters) == []
        assert _status(_generate, server, prompt, "live")[0] == grpc.StatusCode.NOT_FOUND
        # vLLM's HTTP routes do the same.
        body = {"lora_name": "web", "lora_path": str(folders["mlp-r8"])}
        assert httpx.post(f"{server.http_url}/v1/load_lora_adapter", json=body).status_code == 200
        assert _generate(server, prompt, "web") == peft_generate(base, folders["mlp-r8"], prompt)
        gone = httpx.post(f"{server.http_url}/v1/unload_lora_adapter", json={"lora_name": "web"})
        assert gone.status_code == 200
        missing = httpx.post(f"{server.http_url}/v1/unload_lora_adapter", json={"lora_name": "web"})
        assert missing.status_code == 404
    finally:
        server.close()
    fixed = ServerThread(LoadedModel(model=served, tokenizer=None, name="tiny"), max_running=2)
    try:
        request = pb.LoadAdapterRequest(name="live", path=str(folders["all-r2"]))
        code, details = _status(fixed.stub.LoadAdapter, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "--allow-runtime-lora" in details
    finally:
        fixed.close()
