"""The engine's oneDNN-prepacked Linear layers: the model packed in place computes what it computed, faster, and
holds one copy of the Linear weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from genserve.scheduler.core.config import EngineConfig
from genserve.scheduler.engine.loop import Engine
from genserve.scheduler.model import packed_embeddings
from genserve.scheduler.model.cpu_linear import (
    FusedProjection,
    FusedProjections,
    PrepackedLinear,
    SharedWeightLinear,
    is_prepacked,
    prepack_in_place,
    resolve_linear_kernel,
    with_linear_kernel,
)
from genserve.scheduler.model.loader import LoadedModel
from genserve.scheduler.model.packed_embeddings import PackedRows
from tests.architectures import COMMON
from tests.conftest import StepDriver, hf_generate, tiny_model
from tests.references import with_plain_reference

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linear_layers(model: torch.nn.Module, *kinds: type) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) in kinds]


def test_packing_replaces_every_linear_in_place_and_lets_their_plain_weights_go() -> None:
    model, plain_model = tiny_model(), tiny_model()
    plain = _linear_layers(model, torch.nn.Linear)
    untouched = {name: p for name, p in model.named_parameters() if "proj" not in name and "lm_head" not in name}
    prepack_in_place(model, batch_hint=8)
    assert _linear_layers(model, PrepackedLinear, FusedProjection) == plain and plain
    assert not _linear_layers(model, torch.nn.Linear) and is_prepacked(model)
    fused = _linear_layers(model, FusedProjection)  # q/k/v and gate/up of each layer
    assert len(fused) == 5 * model.config.num_hidden_layers and all(
        name.rsplit(".", 1)[1] in {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} for name in fused
    )
    # Only the embeddings and norms stay as parameters; the Linear layers' weights live packed only.
    remaining = dict(model.named_parameters())
    assert remaining.keys() == untouched.keys() and all(remaining[name] is untouched[name] for name in untouched)
    down = model.model.layers[0].mlp.down_proj.weight  # shape and dtype for code that reads them, no memory
    assert down.device.type == "meta" and down.shape == plain_model.model.layers[0].mlp.down_proj.weight.shape
    input_ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.inference_mode():
        expected, actual = plain_model(input_ids).logits, model(input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    packed_bytes = sum(buffer.numel() * buffer.element_size() for buffer in model.buffers() if not buffer.is_meta)
    projection_bytes = sum(
        p.numel() * p.element_size() for n, p in plain_model.named_parameters() if "proj" in n or "lm_head" in n
    )
    assert projection_bytes <= packed_bytes <= 1.05 * projection_bytes + 10**5
    prepack_in_place(model, batch_hint=8)  # a second engine on the same model: nothing left to pack
    assert _linear_layers(model, PrepackedLinear, FusedProjection) == plain


@pytest.mark.parametrize("vocab_size", [1000, 1003])  # 1003 rows: the packed layout pads the last block
def test_a_head_tied_to_the_embeddings_is_packed_once_and_lookups_read_its_rows(vocab_size: int) -> None:
    config = LlamaConfig(**{**COMMON, "vocab_size": vocab_size}, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    plain_embeddings = model.get_input_embeddings().weight.detach().clone()
    hidden, input_ids = torch.randn(5, COMMON["hidden_size"]), torch.randint(0, vocab_size, (3, 11))
    with torch.inference_mode():
        expected_logits, expected_rows = model.lm_head(hidden), model.get_input_embeddings()(input_ids)
    prepack_in_place(model, batch_hint=4)
    lookup = model.get_input_embeddings()
    assert isinstance(model.lm_head, PrepackedLinear) and isinstance(lookup, PackedRows)
    assert lookup.packed is model.lm_head.packed_weight  # one copy of the matrix, packed
    assert not [name for name, _ in model.named_parameters() if "embed" in name or "lm_head" in name]
    assert lookup.weight.is_meta and lookup.weight.shape == (vocab_size, COMMON["hidden_size"])
    with torch.inference_mode():
        assert torch.equal(lookup(input_ids), expected_rows)
        assert torch.equal(lookup(torch.arange(vocab_size)), plain_embeddings)  # every row, bit for bit
        torch.testing.assert_close(model.lm_head(hidden), expected_logits, rtol=1e-5, atol=1e-5)


def test_a_tied_head_whose_packed_rows_do_not_read_back_stays_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)).eval()
    hidden = torch.randn(5, COMMON["hidden_size"])
    with torch.inference_mode():
        expected = model.lm_head(hidden)
    learn = packed_embeddings._learn_offsets

    def reversed_rows(*arguments: object) -> tuple[torch.Tensor, torch.Tensor]:
        row_offsets, column_offsets = learn(*arguments)
        return row_offsets.flip(0), column_offsets  # a layout read wrongly: the read-back check must refuse it

    monkeypatch.setattr(packed_embeddings, "_learn_offsets", reversed_rows)
    prepack_in_place(model, batch_hint=4)
    assert isinstance(model.lm_head, SharedWeightLinear) and not list(model.lm_head.buffers())
    assert model.lm_head.weight is model.get_input_embeddings().weight
    with torch.inference_mode():
        torch.testing.assert_close(model.lm_head(hidden), expected, rtol=1e-5, atol=1e-5)


def test_fused_siblings_answer_each_input_and_keep_no_activations() -> None:
    torch.manual_seed(0)
    linears = [torch.nn.Linear(12, width, bias=width != 5) for width in (8, 5, 3)]  # one without a bias
    group = FusedProjections(linears, batch_hint=4)
    siblings = [FusedProjection(linear, group, index, set()) for index, linear in enumerate(linears)]
    first, second = torch.randn(2, 7, 12), torch.randn(4, 12)
    with torch.inference_mode():
        shared = [sibling(first) for sibling in siblings]  # one GEMM for the three
        assert group.pending.shares.input is None and not group.pending.shares.outputs
        interleaved = [siblings[0](second), siblings[1](first), siblings[2](second), siblings[1](second)]
        for sibling, output in zip(siblings, shared):
            torch.testing.assert_close(output, linears[sibling.index](first), rtol=1e-5, atol=1e-5)
        expected = [linears[0](second), linears[1](first), linears[2](second), linears[1](second)]
        for output, reference in zip(interleaved, expected):
            torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)


def test_engine_picks_onednn_on_cpu_fp32_only_and_refuses_it_elsewhere() -> None:
    plain = LoadedModel(model=tiny_model(), tokenizer=None, name="plain")
    assert Engine(plain, EngineConfig(max_running=2, linear_kernel="aten")).runner.model is plain.model
    assert not is_prepacked(plain.model)
    assert isinstance(Engine(plain, EngineConfig(max_running=2)).runner.model.lm_head, PrepackedLinear)
    assert Engine(plain, EngineConfig(max_running=2)).runner.model is plain.model  # packed in place, once
    with pytest.raises(ValueError, match="packed for oneDNN"):
        with_linear_kernel(plain.model, "aten", batch_hint=2)
    half = tiny_model().to(torch.bfloat16)
    assert resolve_linear_kernel("auto", half) == "aten"
    with pytest.raises(ValueError, match="fp32"):
        resolve_linear_kernel("onednn", half)
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        EngineConfig(linear_kernel="blas")


@pytest.mark.parametrize("kernel", ["aten", "onednn"])
def test_greedy_tokens_equal_plain_generate_with_either_kernel(kernel: str) -> None:
    tiny = LoadedModel(model=with_plain_reference(tiny_model()), tokenizer=None, name="tiny")
    driver = StepDriver(tiny, max_running=4, linear_kernel=kernel)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 64, (length,), generator=generator).tolist() for length in (5, 23, 41, 12, 60)]
    driver.run({step * 2: [(f"r{step}", prompt, {"max_new_tokens": 30})] for step, prompt in enumerate(prompts)})
    for index, prompt in enumerate(prompts):
        params = driver.engine.make_parameters(max_new_tokens=30)
        assert driver.tokens[f"r{index}"] == hf_generate(tiny.model, prompt, params), f"r{index}"
