"""The attention masks a batched pass hands a HF model, in the form that model's code takes.

Rows in a batch sit at different positions, so a decode pass (and a prefill that continues a cached prefix)
brings its own mask: each query sees its own row's keys up to its position, and on a sliding-window layer only
the last `sliding_window` of them (HF's rule: key > query - window). Models answer for this in three ways:
- one 4D mask for every layer (Llama, GPT-2, ...; Mistral-style models, where every layer slides);
- a mask per layer type, `{"full_attention": ..., "sliding_attention": ...}`, for models that alternate local
  and global layers (Gemma 2/3, Cohere 2, GPT-OSS, ...): their code takes such a dict as it is;
- a 2D padding mask, for ALiBi models that derive their position bias from it (Bloom, Falcon with alibi). A 2D
  mask can say how long each row is but not where each of several queries of one row stands, so these models
  decode one query per row (no speculative multi-token passes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"
ATTENTION_LAYER_TYPES = (FULL, SLIDING)
# ALiBi models whose modeling code builds its bias from a 2D padding mask and cannot take a 4D one.
PADDING_MASK_MODEL_TYPES = frozenset({"bloom"})


@dataclass(frozen=True)
class AttentionLayout:
    layer_types: tuple[str, ...]  # per decoder layer: FULL or SLIDING
    sliding_window: int | None
    by_layer_type: bool  # the model takes a dict of masks keyed by layer type
    padding_mask_only: bool  # the model takes a 2D padding mask only (see the module docstring)
    additive_dtype: torch.dtype | None = None  # eager attention adds its mask: 0 where seen, the dtype's min elsewhere

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> AttentionLayout:
        """Read the layout from the config, and whether the modeling code builds sliding-window masks at all (a
        Llama config that happens to carry `sliding_window` never slides)."""
        config = model.config.get_text_config()
        num_layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        declared = getattr(config, "layer_types", None)
        if declared:
            layer_types = tuple(declared[:num_layers])
        else:
            modeling = sys.modules[type(model.get_decoder()).__module__]
            slides = window is not None and hasattr(modeling, "create_sliding_window_causal_mask")
            layer_types = (SLIDING if slides else FULL,) * num_layers
        if SLIDING not in layer_types:
            window = None
        model_type = config.model_type
        padding_only = model_type in PADDING_MASK_MODEL_TYPES or bool(getattr(config, "alibi", False))
        return cls(
            layer_types=layer_types,
            sliding_window=window,
            by_layer_type=bool(declared) and len(set(layer_types)) > 1,
            padding_mask_only=padding_only,
            additive_dtype=model.dtype if config._attn_implementation == "eager" else None,
        )

    @property
    def is_sliding(self) -> list[bool]:
        return [kind == SLIDING for kind in self.layer_types]

    def masks(self, positions: torch.Tensor, read_length: int) -> torch.Tensor | dict[str, torch.Tensor]:
        """What to pass as `attention_mask` for queries at `positions` ([rows, queries]) reading `read_length`
        positions of each row's cache."""
        if self.padding_mask_only:
            return _visible(positions[:, -1:], read_length)[:, 0, 0]  # [rows, read_length]
        if not self.by_layer_type:
            return self._mask(self.layer_types[0], positions, read_length)
        return {kind: self._mask(kind, positions, read_length) for kind in set(self.layer_types)}

    def _mask(self, kind: str, positions: torch.Tensor, read_length: int) -> torch.Tensor:
        seen = _visible(positions, read_length)
        if kind == SLIDING:
            keys = torch.arange(read_length, device=positions.device).view(1, 1, 1, -1)
            seen &= keys > positions.unsqueeze(1).unsqueeze(3) - self.sliding_window
        if self.additive_dtype is None:
            return seen
        # As HF's eager_mask: the boolean mask cast to 0 and the dtype's minimum.
        zero = torch.zeros((), dtype=self.additive_dtype, device=seen.device)
        return torch.where(seen, zero, torch.finfo(self.additive_dtype).min)


def _visible(positions: torch.Tensor, read_length: int) -> torch.Tensor:
    """The causal mask [rows, 1, queries, read_length]: each query sees its own row's positions up to its own."""
    keys = torch.arange(read_length, device=positions.device)
    return (keys.view(1, 1, -1) <= positions.unsqueeze(2)).unsqueeze(1)
