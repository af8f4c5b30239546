"""The llama.cpp comparison's own parts that run without llama.cpp (which is built from source, never in CI):
the fixed workload and genserve's side of it over gRPC. The llama-server side runs in `genserve bench
--baselines llama.cpp` on a machine that has it (README, "CPU against vLLM and llama.cpp")."""

from __future__ import annotations

import pytest

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.engine.loop import Engine
from genserve.service.benchmarks.llama_cpp import find_llama_server, fixed_prompts, format_comparison, run_genserve


def test_fixed_prompts_have_the_asked_length(tiny_with_tokenizer) -> None:
    prompts = fixed_prompts(tiny_with_tokenizer.tokenizer, 4, 80)
    assert [len(p) for p in prompts] == [80] * 4 and len({tuple(p) for p in prompts}) == 4


def test_genserve_side_generates_every_token_over_grpc(tiny_with_tokenizer) -> None:
    engine = Engine(tiny_with_tokenizer, EngineConfig(max_running=4))
    prompts = fixed_prompts(tiny_with_tokenizer.tokenizer, 4, 20)
    run = run_genserve("genserve", engine, prompts, new_tokens=12)
    assert run.generated_tokens == 4 * 12 and run.seconds > 0
    assert "| genserve | 48 |" in format_comparison([run], 4, 20, 12)


def test_missing_llama_server_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(SystemExit, match="llama-server"):
        find_llama_server(str(tmp_path / "nowhere" / "llama-server"))
