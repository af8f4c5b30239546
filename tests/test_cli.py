"""The `genserve` command: every subcommand explains itself, and `bench` runs end to end on a small model."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from genserve.service.cli.flags import AUTO_KV_CACHE_MEMORY, engine_config, memory_size
from genserve.service.cli.main import build_parser, main
from tests.conftest import byte_tokenizer, tiny_model


@pytest.mark.parametrize("command", ["serve", "bench", "generate", "chat", "loadtest"])
def test_every_subcommand_has_help(command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "genserve.service.cli.main", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "usage: genserve" in result.stdout and len(result.stdout) > 300


def test_bench_reports_ratios_and_exactness(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    code = main(
        [
            "bench",
            "--model",
            str(tmp_path / "tiny"),
            "--num-prompts",
            "6",
            "--min-new-tokens",
            "4",
            "--max-new-tokens",
            "12",
            "--max-batch-size",
            "4",
            "--baselines",
            "sequential,static",
        ]
    )
    report = capsys.readouterr().out
    assert code == 0
    assert "HF generate(), one at a time" in report and "static batches of 4" in report
    assert "bare decode-step ceiling at batch 4" in report
    assert "greedy outputs identical to generate(): 6/6 requests" in report


def test_bench_decode_latency_table(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--decode-latency"]
    plot = tmp_path / "decode.png"
    code = main([*arguments, "--batch-sizes", "1,4", "--decode-context", "16", "--decode-plot", str(plot)])
    report = capsys.readouterr().out
    assert code == 0 and "measured copy bandwidth" in report
    assert plot.read_bytes().startswith(b"\x89PNG")
    rows = [line.split("|") for line in report.splitlines() if line.startswith("| 1 ") or line.startswith("| 4 ")]
    assert len(rows) == 2
    for row in rows:
        step_ms, floor_ms = float(row[3].split()[0]), float(row[4].split()[0])
        assert step_ms > 0 and floor_ms > 0


def test_bench_decode_latency_one_column_per_mode(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--decode-latency"]
    arguments += ["--batch-sizes", "1,2", "--decode-context", "8", "--decode-dtypes", "float32,bfloat16"]
    code = main([*arguments, "--decode-linear-kernels", "aten,onednn"])
    report = capsys.readouterr().out
    # oneDNN packing serves fp32 only: bfloat16 gets one column
    columns = ["float32 aten", "float32 onednn", "bfloat16 aten"]
    assert code == 0 and all(f"{column}: step (step / floor)" in report for column in columns)
    rows = [line for line in report.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert len(rows) == 2 and all(line.count(" ms (") == 3 for line in rows)


def test_bench_decode_profile_splits_each_step(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--decode-profile"]
    code = main([*arguments, "--batch-sizes", "1,3", "--decode-context", "12"])
    report = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith(("| 1 ", "| 3 "))]
    assert code == 0 and len(rows) == 2
    for rows_held, row in zip((1, 3), rows):
        assert row[1].strip().endswith(f"({rows_held * 12})")  # every row prefilled in one step
        step, gemms, attention, other = (float(cell) for cell in row[2:6])
        assert step > 0 and gemms > 0 and attention > 0 and other > 0  # the tiny model's ops were all seen


def test_bench_long_prompt_stall_table(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--long-prompt"]
    code = main([*arguments, "--long-prompt-tokens", "300", "--max-num-batched-tokens", "48"])
    report = capsys.readouterr().out
    assert code == 0 and "Long prompt admitted while 4 streams decode" in report
    rows = [line.split("|") for line in report.splitlines() if line.startswith(("| chunked", "| whole"))]
    assert [row[1].strip() for row in rows] == ["chunked, 48 tokens/step", "whole prompt in one step"]
    assert all(row[-2].strip() == "yes" for row in rows)  # the long prompt's tokens equal generate()'s
    assert all(float(row[3]) > 0 for row in rows)  # the gap as a fraction of the idle prefill (timing: no bound)


def test_bench_lora_table(tmp_path: Path, capsys) -> None:
    tiny_model().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--baselines", "", "--lora"]
    arguments += ["--lora-rows", "5", "--lora-adapters", "2", "--lora-rank", "4", "--lora-context", "8"]
    code = main([*arguments, "--lora-new-tokens", "6", "--lora-rounds", "2"])
    report = capsys.readouterr().out
    assert code == 0 and "the others the median of 2 rounds" in report
    rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| ") and "ms |" in line]
    labels = [row[0].strip() for row in rows]
    assert labels == [
        "base model, no adapters served",
        "adapters served, every row on the base",
        "every row on one adapter",
        "2 adapters and the base, mixed",
    ]
    assert rows[0][2].strip() == "1.00x"
    assert all(float(row[1].split()[0]) > 0 and float(row[3]) > 0 for row in rows)


def test_serve_defaults_to_a_paged_cache_sized_for_the_device() -> None:
    parser = build_parser()
    auto = engine_config(parser.parse_args(["serve", "--device", "cpu"]))
    assert auto.paged and auto.kv_cache_memory == AUTO_KV_CACHE_MEMORY["cpu"] == 4 * 2**30
    assert engine_config(parser.parse_args(["serve", "--device", "cuda"])).kv_cache_memory == 0.9
    assert not engine_config(parser.parse_args(["serve", "--kv-cache-memory", "0"])).paged  # a slot per row
    assert engine_config(parser.parse_args(["serve", "--kv-cache-memory", "1GiB"])).kv_cache_memory == 2**30


def test_bench_kv_capacity_table_and_memory_sizes(tmp_path: Path, capsys) -> None:
    assert [memory_size(text) for text in ("1GiB", "512MiB", "2G", "0.9", "4096")] == [2**30, 2**29, 2e9, 0.9, 4096]
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        memory_size("lots")
    config = engine_config(build_parser().parse_args(["serve", "--kv-cache-memory", "64MiB"]))
    assert config.kv_cache_memory == 64 * 2**20 and config.paged
    tiny_model().save_pretrained(tmp_path / "tiny")
    arguments = ["bench", "--model", str(tmp_path / "tiny"), "--skip-main", "--baselines", "", "--kv-capacity"]
    arguments += ["--kv-cache-memory", "1MiB", "--capacity-max-context", "1024", "--capacity-requests", "12"]
    code = main([*arguments, "--capacity-request-tokens", "60", "--capacity-new-tokens", "20"])
    report = capsys.readouterr().out
    assert code == 0 and "requests of 60 tokens" in report
    rows = {line.split("|")[1].strip(): line.split("|") for line in report.splitlines() if line.startswith("| ")}
    # 1 MiB holds two slots of 1,024 x 512 B; paged, 127 blocks of 16 hold all twelve requests (4 blocks each).
    assert int(rows["slot per row"][2]) == int(rows["slot per row"][3]) == 2
    assert int(rows["paged"][3]) == 12 and rows["paged"][4].strip() == "6.0x"


def test_generate_command_sends_constraints_and_guidance(tiny_with_tokenizer, tmp_path: Path, capsys) -> None:
    import json
    import re

    from genserve.service.proto_gen.genserve.v1 import generate_pb2 as pb
    from tests.serving import ServerThread

    server = ServerThread(tiny_with_tokenizer, max_running=4)
    try:
        schema = tmp_path / "schema.json"
        schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
        target = ["--target", server.target, "--max-new-tokens", "40"]
        assert main(["generate", "hello", *target, "--regex", "[a-c]{2,5}!"]) == 0
        assert re.fullmatch(r"[a-c]{2,5}!", capsys.readouterr().out.strip())
        assert main(["generate", "hello", *target, "--json-schema", str(schema), "--seed", "3", "--do-sample"]) == 0
        assert isinstance(json.loads(capsys.readouterr().out)["ok"], bool)
        assert main(["generate", "hello", *target, "--choice", "yes", "--choice", "no", "--stream"]) == 0
        assert capsys.readouterr().out.strip() in {"yes", "no"}
        # Guidance: the command's text is what the server gives that guided request, and guidance changed it.
        assert main(["generate", "hi", *target, "--guidance-scale", "2", "--negative-prompt", "x"]) == 0
        guided = capsys.readouterr().out.removesuffix("\n")
        parameters = pb.GenerationParameters(max_new_tokens=40, guidance_scale=2)
        assert (
            guided == server.stub.Generate(pb.GenerateRequest(text="hi", negative_text="x", parameters=parameters)).text
        )
        plain = pb.GenerateRequest(text="hi", parameters=pb.GenerationParameters(max_new_tokens=40))
        assert guided != server.stub.Generate(plain).text
        # Prompt lookup: proposals were made and verified (the prompt repeats itself), and greedy text is unchanged.
        speculated = server.engine.runner.counters().speculated
        assert main(["generate", "hello hello hello", *target, "--prompt-lookup", "3"]) == 0
        assert server.engine.runner.counters().speculated > speculated
        plain = pb.GenerateRequest(text="hello hello hello", parameters=pb.GenerationParameters(max_new_tokens=40))
        assert capsys.readouterr().out.removesuffix("\n") == server.stub.Generate(plain).text
        assert main(["generate", "hi", *target, "--regex", "(("]) == 1
        assert "INVALID_ARGUMENT: regex" in capsys.readouterr().err
    finally:
        server.close()


def test_serving_imports_neither_the_benchmarks_nor_matplotlib() -> None:
    import subprocess
    import sys

    check = (
        "import sys, genserve.service.server, genserve.service.cli.main; "
        "loaded = [m for m in sys.modules if m == 'matplotlib' or m.startswith('genserve.scheduler.benchmarks')]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
