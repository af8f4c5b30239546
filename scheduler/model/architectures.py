"""Which decoder architectures the engine serves, and how each is loaded.

Everything here is decided at start-up: a model the engine cannot serve exactly is refused before it serves a
request, with a message naming its architecture and the reason, and the attention implementation is chosen
per model (sdpa where it is supported and exact, eager where the model needs it).
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, DynamicCache, PretrainedConfig

from genserve.scheduler.core.errors import UnsupportedModelError

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager")
# Layer kinds the slot cache serves: attention over every earlier token, or over a sliding window of them.
SERVED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
UNSERVED_LAYER_REASONS = {
    "linear_attention": "state-space or linear-attention layers (recurrent state, not KV)",
    "hybrid": "hybrid layers (attention and state-space in parallel)",
    "chunked_attention": "chunked local attention layers",
}


def architecture_name(config: PretrainedConfig) -> str:
    return (config.architectures or [config.model_type])[0]


def check_servable(config: PretrainedConfig) -> None:
    """Refuse, from the config alone, what the engine cannot serve: encoder-decoders, non-causal-LM models, and
    layers whose state is not attention KV (state-space, linear-attention, chunked or hybrid layers)."""
    name = architecture_name(config)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; genserve serves decoder-only causal LMs")
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedModelError(f"{name} ({config.model_type}) has no causal-LM head in transformers")
    text_config = config.get_text_config()
    unserved = sorted(set(getattr(text_config, "layer_types", None) or ()) - SERVED_LAYER_TYPES)
    if unserved:
        kinds = "; ".join(UNSERVED_LAYER_REASONS.get(kind, f"{kind} layers") for kind in unserved)
        raise UnsupportedModelError(f"{name} has {kinds}; the engine serves full and sliding-window attention")
    try:
        has_recurrent_layers = any(DynamicCache(config=text_config).is_linear)
    except ValueError as error:  # e.g. KV shared across layers (Gemma 3n)
        raise UnsupportedModelError(f"{name}: its cache layout is not one KV per layer ({error})") from None
    if has_recurrent_layers:
        raise UnsupportedModelError(f"{name} has {UNSERVED_LAYER_REASONS['linear_attention']}")


def choose_attn_implementation(config: PretrainedConfig, requested: str = "auto") -> tuple[str, str]:
    """The attention implementation to load the model with, and why."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"--attn-implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, not {requested!r}")
    if requested != "auto":
        return requested, "--attn-implementation"
    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        return "eager", "attention logit soft-capping (sdpa cannot apply it)"
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    if not getattr(model_class, "_supports_sdpa", False):
        return "eager", f"{model_class.__name__} does not support sdpa"
    return "sdpa", "supported by the model"
