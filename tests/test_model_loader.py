"""Loading: bundled dummy shapes need no files, and a local HF folder loads with the engine serving it."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.scheduler.model.loader import BUNDLED_CONFIGS, load_model, resolve_dtype
from tests.conftest import StepDriver, tiny_model


def test_bundled_shapes_exist() -> None:
    assert {p.name for p in BUNDLED_CONFIGS.iterdir() if p.is_dir()} >= {"smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"}


def test_dummy_weights_from_a_bundled_shape_generate(tmp_path: Path) -> None:
    loaded = load_model("smollm2-135m", load_format="dummy", device="cpu")
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert loaded.tokenizer is None and "dummy" in loaded.name
    driver = StepDriver(loaded, max_running=2)
    driver.submit("r", [1, 2, 3], max_new_tokens=4, ignore_eos=True)
    driver.run()
    assert len(driver.tokens["r"]) == 4


def test_local_folder_loads_and_matches_the_saved_model(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), device="cpu")
    assert loaded.name == "tiny" and loaded.tokenizer is None
    original, reloaded = model.state_dict(), loaded.model.state_dict()
    assert all((original[k] == reloaded[k]).all() for k in original)


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model("/nonexistent/model", device="cpu")
    with pytest.raises(ValueError, match="--dtype"):
        resolve_dtype("int3", device=None)
