"""The slot cache against the `transformers.Cache` interface itself, and the masks against HF's own builders."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

from genserve.scheduler.core.errors import UnsupportedModelError
from genserve.scheduler.kv.attention_masks import FULL, SLIDING, AttentionLayout
from genserve.scheduler.kv.slot_cache import SlotKVCache, decode_pass

GENERATE_ONLY = {
    "crop",
    "reorder_cache",
    "batch_select_indices",
    "batch_repeat_interleave",
    "early_initialization",
    "activate_past_recording",
}
RECURRENT = {
    "get_conv_state",
    "update_conv_state",
    "increase_count",
    "get_recurrent_state",
    "update_recurrent_state",
    "update_indexer",
}


def _public_members() -> list[str]:
    return [name for name, _ in inspect.getmembers(Cache) if not name.startswith("_")]


def test_every_public_member_of_cache_is_answered_by_the_slot_cache_itself() -> None:
    """Nothing falls through to `Cache`'s own implementation, which walks `self.layers` (empty here)."""
    inherited = [name for name in _public_members() if name not in vars(SlotKVCache)]
    assert not inherited, f"SlotKVCache leaves these to Cache: {inherited}"
    assert issubclass(SlotKVCache, Cache)


def test_answers_during_passes(tiny) -> None:
    cache = SlotKVCache.for_model(tiny.model, max_rows=4, max_context=64, spare_positions=0)
    config = tiny.model.config
    assert len(cache) == config.num_hidden_layers and cache.is_initialized
    assert cache.is_sliding == [False] * len(cache) and not any(cache.is_linear) and not any(cache.is_dummy)
    assert cache.layer_shapes(0) == ((config.num_key_value_heads, 16), (config.num_key_value_heads, 16))
    assert cache.bytes_per_token == 2 * len(cache) * config.num_key_value_heads * 16 * 4
    assert cache.get_max_length() == 64 and not cache.is_compileable and not cache.is_croppable
    cache.begin_prefill(1, 1, num_queries=5, offset=3)
    assert (cache.get_seq_length(), cache.get_query_offset(0), cache.get_mask_sizes(5, 0)) == (3, 3, (8, 0))
    assert cache.batch_size == 1
    positions = torch.tensor([[6], [9]])
    decode_pass(tiny.model, cache, torch.tensor([[5], [6]]), positions, read_length=10)
    assert (cache.get_seq_length(), cache.get_mask_sizes(1, 0), cache.batch_size) == (9, (10, 0), 2)
    assert not cache.has_previous_state() and not cache.is_recording_past(0)
    assert cache.get_recurrent_states_to_keep() == 0 and cache.get_recurrent_states_to_keep(0) == 0
    cache.offload(0)
    cache.prefetch(0)
    for name in GENERATE_ONLY:
        with pytest.raises(NotImplementedError, match=name):
            _call_with_dummies(cache, name)
    for name in RECURRENT:
        with pytest.raises(UnsupportedModelError):
            _call_with_dummies(cache, name)
    cache.reset()
    assert all(int(keys.count_nonzero()) == 0 for keys in cache.keys)


def _call_with_dummies(cache: SlotKVCache, name: str) -> object:
    method = getattr(cache, name)
    required = [
        p
        for p in inspect.signature(method).parameters.values()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return method(*[torch.zeros(1, dtype=torch.long) if "states" in p.name or "idx" in p.name else 1 for p in required])


def _layout(kind: str, window: int | None, by_layer_type: bool = False) -> AttentionLayout:
    return AttentionLayout((kind,), window, by_layer_type=by_layer_type, padding_mask_only=False)


@pytest.mark.parametrize(("kind", "window"), [(FULL, None), (SLIDING, 4)])
def test_each_row_gets_hf_s_own_mask_at_its_own_position(kind: str, window: int | None) -> None:
    """Rows at different positions in one pass: each row's mask equals what HF builds for that row alone."""
    positions = torch.tensor([[3, 4], [9, 10], [6, 7]])  # two queries per row
    read_length = 11
    ours = _layout(kind, window).masks(positions, read_length)
    function = causal_mask_function if kind == FULL else sliding_window_causal_mask_function(window)
    for row, (first, _) in enumerate(positions.tolist()):
        hf = sdpa_mask(
            batch_size=1,
            q_length=2,
            kv_length=read_length,
            q_offset=first,
            mask_function=function,
            allow_is_causal_skip=False,
        )
        assert torch.equal(ours[row : row + 1], hf), f"row {row}"


def test_alternating_layers_get_a_mask_per_layer_type_and_eager_gets_additive_masks() -> None:
    layout = AttentionLayout(
        (SLIDING, FULL), 2, by_layer_type=True, padding_mask_only=False, additive_dtype=torch.float32
    )
    masks = layout.masks(torch.tensor([[5]]), 6)
    assert set(masks) == {FULL, SLIDING}
    minimum = torch.finfo(torch.float32).min
    assert masks[FULL][0, 0, 0].tolist() == [0.0] * 6
    assert masks[SLIDING][0, 0, 0].tolist() == [minimum] * 4 + [0.0] * 2


def test_padding_mask_models_get_each_row_s_length() -> None:
    layout = AttentionLayout((FULL,), None, by_layer_type=False, padding_mask_only=True)
    mask = layout.masks(torch.tensor([[2], [4]]), 5)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
