"""The engine's oneDNN-prepacked Linear layers: a copy of the model that computes what it computes, faster, and
leaves the caller's model (the `generate()` reference) as it was."""

from __future__ import annotations

import pytest
import torch

from scheduler.config import EngineConfig
from scheduler.cpu_linear import PrepackedLinear, prepacked_copy, resolve_linear_kernel
from scheduler.engine import Engine
from scheduler.model_loader import LoadedModel
from tests.conftest import StepDriver, hf_generate, tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linear_layers(model: torch.nn.Module, kind: type) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is kind]


def test_the_copy_packs_every_linear_shares_the_rest_and_leaves_the_original_alone() -> None:
    model = tiny_model()
    plain = _linear_layers(model, torch.nn.Linear)
    packed = prepacked_copy(model, batch_hint=8)
    assert _linear_layers(packed, PrepackedLinear) == plain and plain
    assert _linear_layers(model, torch.nn.Linear) == plain  # the caller's model is unchanged
    assert not _linear_layers(packed, torch.nn.Linear)
    original = {name: parameter for name, parameter in model.named_parameters()}
    for name, parameter in packed.named_parameters():
        assert parameter is original[name], name  # shared, not copied
    input_ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.inference_mode():
        expected, actual = model(input_ids).logits, packed(input_ids).logits
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert packed.get_output_embeddings().weight.shape == model.get_output_embeddings().weight.shape


def test_engine_picks_onednn_on_cpu_fp32_only_and_refuses_it_elsewhere(tiny: LoadedModel) -> None:
    assert isinstance(Engine(tiny, EngineConfig(max_running=2)).runner.model.lm_head, PrepackedLinear)
    assert Engine(tiny, EngineConfig(max_running=2, linear_kernel="aten")).runner.model is tiny.model
    half = tiny_model().to(torch.bfloat16)
    assert resolve_linear_kernel("auto", half) == "aten"
    with pytest.raises(ValueError, match="fp32"):
        resolve_linear_kernel("onednn", half)
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        EngineConfig(linear_kernel="blas")


@pytest.mark.parametrize("kernel", ["aten", "onednn"])
def test_greedy_tokens_equal_plain_generate_with_either_kernel(tiny: LoadedModel, kernel: str) -> None:
    driver = StepDriver(tiny, max_running=4, linear_kernel=kernel)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (length,), generator=generator).tolist() for length in (5, 23, 41, 12, 60)]
    driver.run({step * 2: [(f"r{step}", prompt, {"max_new_tokens": 30})] for step, prompt in enumerate(prompts)})
    for index, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(max_new_tokens=30)
        assert driver.tokens[f"r{index}"] == hf_generate(tiny.model, prompt, params), f"r{index}"
