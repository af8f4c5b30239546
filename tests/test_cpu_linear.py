"""The engine's oneDNN-prepacked Linear layers: a copy of the model that computes what it computes, faster, and
leaves the caller's model (the `generate()` reference) as it was."""

from __future__ import annotations

import pytest
import torch

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model.cpu_linear import (
    FusedProjection,
    FusedProjections,
    PrepackedLinear,
    prepacked_copy,
    resolve_linear_kernel,
)
from genserve.scheduler.model.loader import LoadedModel
from tests.conftest import StepDriver, hf_generate, tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linear_layers(model: torch.nn.Module, *kinds: type) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in kinds]


def test_the_copy_packs_every_linear_shares_the_rest_and_leaves_the_original_alone() -> None:
    model = tiny_model()
    plain = _linear_layers(model, torch.nn.Linear)
    packed = prepacked_copy(model, batch_hint=8)
    assert _linear_layers(packed, PrepackedLinear, FusedProjection) == plain and plain
    fused = _linear_layers(packed, FusedProjection)  # q/k/v and gate/up of each layer
    assert len(fused) == 5 * model.config.num_hidden_layers and all(
        name.rsplit(".", 1)[1] in {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} for name in fused
    )
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


def test_fused_siblings_answer_each_input_and_keep_no_activations() -> None:
    torch.manual_seed(0)
    linears = [torch.nn.Linear(12, width, bias=width != 5) for width in (8, 5, 3)]  # one without a bias
    group = FusedProjections(linears, batch_hint=4)
    siblings = [FusedProjection(linear, group, index) for index, linear in enumerate(linears)]
    first, second = torch.randn(2, 7, 12), torch.randn(4, 12)
    with torch.inference_mode():
        shared = [sibling(first) for sibling in siblings]  # one GEMM for the three
        assert group.input is None and not group.outputs
        interleaved = [siblings[0](second), siblings[1](first), siblings[2](second), siblings[1](second)]
        for sibling, output in zip(siblings, shared):
            torch.testing.assert_close(output, linears[sibling.index](first), rtol=1e-5, atol=1e-5)
        expected = [linears[0](second), linears[1](first), linears[2](second), linears[1](second)]
        for output, reference in zip(interleaved, expected):
            torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


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
