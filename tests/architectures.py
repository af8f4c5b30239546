"""The architectures of the parity suite: tiny random-weights configs (no downloads), each saved as a local HF
folder and served like a user's model. Also the architectures refused at start-up, and the README table that is
generated from both (`make architectures` rewrites it; a test fails when it is stale).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 320
EOS = 2
WINDOW = 8  # every sliding-window case: prompts plus outputs run well past it
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=EOS,
    pad_token_id=0,
    bos_token_id=1,
    # Larger than HF's 0.02: random logits then differ by whole units, so a masking or position error changes
    # the tokens instead of hiding under near-uniform scores.
    initializer_range=0.2,
)
ALTERNATING = ["sliding_attention", "full_attention"]
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
SMALL_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclass(frozen=True)
class Case:
    label: str
    model_type: str
    shape: str  # what this case exercises, for the README table
    overrides: dict = field(default_factory=dict)

    @property
    def sliding_window(self) -> int | None:
        return self.overrides.get("sliding_window")


SERVED = [
    Case("Llama", "llama", "RoPE, GQA, untied embeddings"),
    Case("Mistral", "mistral", "sliding window on every layer", dict(sliding_window=WINDOW)),
    Case("Mixtral", "mixtral", "mixture of experts, sliding window", dict(sliding_window=WINDOW, **EXPERTS)),
    Case("Qwen2", "qwen2", "q/k/v biases, GQA"),
    Case(
        "Qwen2-MoE",
        "qwen2_moe",
        "experts with a shared expert",
        dict(**SMALL_EXPERTS, shared_expert_intermediate_size=32),
    ),
    Case("Qwen3", "qwen3", "q/k norms"),
    Case("Qwen3-MoE", "qwen3_moe", "mixture of experts", SMALL_EXPERTS),
    Case(
        "Gemma",
        "gemma",
        "tied and scaled embeddings, MQA",
        dict(num_key_value_heads=1, head_dim=16, initializer_range=0.3),
    ),
    Case(
        "Gemma 2",
        "gemma2",
        "alternating local/global layers, attention and final-logit soft-capping (eager)",
        dict(sliding_window=WINDOW, head_dim=16, layer_types=ALTERNATING, tie_word_embeddings=False),
    ),
    Case(
        "Gemma 3",
        "gemma3_text",
        "alternating local/global layers, local RoPE base, final-logit soft-capping",
        dict(
            sliding_window=WINDOW,
            head_dim=16,
            layer_types=ALTERNATING,
            final_logit_softcapping=30.0,
            tie_word_embeddings=False,
        ),
    ),
    Case("Cohere", "cohere", "parallel attention and MLP, logit scale", dict(initializer_range=0.3)),
    Case(
        "Cohere 2",
        "cohere2",
        "alternating local/global layers, parallel block",
        dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    ),
    Case("Phi", "phi", "parallel attention and MLP, partial RoPE, MHA", dict(num_key_value_heads=4)),
    Case("Phi-3", "phi3", "fused qkv, sliding window", dict(sliding_window=WINDOW)),
    Case("Phi-MoE", "phimoe", "mixture of experts", EXPERTS),
    Case("GPT-2", "gpt2", "absolute position embeddings, MHA", dict(n_positions=512)),
    Case("OPT", "opt", "learned positions with an offset, MHA", dict(ffn_dim=128)),
    Case("Bloom", "bloom", "ALiBi from a 2D padding mask (eager), tied embeddings", dict(initializer_range=0.3)),
    Case("MPT", "mpt", "ALiBi bias (eager)", dict(expansion_ratio=2)),
    Case("Falcon", "falcon", "parallel attention, MQA", dict(new_decoder_architecture=False, multi_query=True)),
    Case("Falcon (new decoder)", "falcon", "GQA, two layer norms", dict(new_decoder_architecture=True, num_kv_heads=2)),
    Case("GPT-J", "gptj", "parallel attention and MLP, partial rotary", dict(rotary_dim=8)),
    Case("GPT-NeoX", "gpt_neox", "parallel residual, partial rotary, MHA"),
    Case("GPT-BigCode", "gpt_bigcode", "multi-query attention, absolute positions", dict(multi_query=True)),
    Case("StableLM", "stablelm", "partial rotary, LayerNorm"),
    Case("Starcoder2", "starcoder2", "sliding window, biases", dict(sliding_window=WINDOW)),
    Case("OLMo", "olmo", "non-parametric LayerNorm"),
    Case("OLMo 2", "olmo2", "post-norm, q/k norms"),
    Case("OLMo 3", "olmo3", "alternating local/global layers", dict(sliding_window=WINDOW, layer_types=ALTERNATING)),
    Case("OLMoE", "olmoe", "mixture of experts", dict(num_experts=4, num_experts_per_tok=2)),
    Case("Granite", "granite", "embedding, residual and logit multipliers"),
    Case("Granite-MoE", "granitemoe", "mixture of experts", EXPERTS),
    Case("SmolLM3", "smollm3", "RoPE skipped on some layers"),
    Case("GLM", "glm", "partial rotary, interleaved"),
    Case("GLM-4", "glm4", "extra post-norms"),
    Case(
        "EXAONE 4", "exaone4", "alternating local/global layers", dict(sliding_window=WINDOW, layer_types=ALTERNATING)
    ),
    Case(
        "GPT-OSS",
        "gpt_oss",
        "attention sinks, alternating windows, experts (eager)",
        dict(sliding_window=WINDOW, layer_types=ALTERNATING, head_dim=16, **EXPERTS),
    ),
    Case(
        "DeepSeek-V3",
        "deepseek_v3",
        "multi-head latent attention (keys and values of different widths), experts",
        dict(
            kv_lora_rank=16,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=12,
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ),
]

REFUSED = [
    Case("Mamba", "mamba", "state-space layers"),
    Case("Jamba", "jamba", "attention and state-space layers", dict(num_experts=2)),
    Case("Falcon-H1", "falcon_h1", "hybrid attention + state-space layers"),
    Case("Qwen3-Next", "qwen3_next", "linear-attention layers", dict(num_experts=2)),
    Case("RWKV", "rwkv", "recurrent layers"),
    Case("Gemma 3n", "gemma3n_text", "KV shared across layers"),
    Case("Llama 4", "llama4_text", "chunked local attention", dict(num_local_experts=2)),
    Case("T5", "t5", "encoder-decoder"),
    Case("BART", "bart", "encoder-decoder"),
]


def tiny_config(case: Case) -> AutoConfig:
    return AutoConfig.for_model(case.model_type, **{**COMMON, **case.overrides})


def save_tiny_model(case: Case, folder: Path, seed: int = 0, **overrides: object) -> Path:
    """A random-weights model of this architecture as a local HF folder, as a user would serve it; `overrides`
    change its config."""
    torch.manual_seed(seed)
    config = tiny_config(case)
    config.update(overrides)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def refusal(case: Case) -> str:
    """The start-up message for a refused architecture (from the loader and the cache's probe, as served)."""
    from genserve.scheduler.core.errors import UnsupportedModelError
    from genserve.scheduler.kv.slot_cache import SlotKVCache
    from genserve.scheduler.model.loader import load_model

    with tempfile.TemporaryDirectory() as folder:
        tiny_config(case).save_pretrained(folder)
        try:
            loaded = load_model(folder, load_format="dummy", device="cpu")
            SlotKVCache.for_model(loaded.model, 1, 16, 0)
        except UnsupportedModelError as error:
            return str(error)
    raise AssertionError(f"{case.label} was not refused")


TABLE_START, TABLE_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def readme_table() -> str:
    """The README's architecture table, from this registry and the live refusal messages."""
    lines = [
        "| architecture | transformers model type | what the case exercises | served |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c.label} | `{c.model_type}` | {c.shape} | exact (greedy and seeded sampling) |" for c in SERVED]
    lines += [f"| {c.label} | `{c.model_type}` | {c.shape} | refused: {refusal(c)} |" for c in REFUSED]
    return "\n".join(lines)


def replace_table(readme: str, table: str) -> str:
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.DOTALL)
    if not pattern.search(readme):
        raise ValueError(f"README has no {TABLE_START} ... {TABLE_END} section")
    return pattern.sub(lambda _: f"{TABLE_START}\n{table}\n{TABLE_END}", readme)


if __name__ == "__main__":  # `make architectures`: rewrite the README's table
    readme = Path(__file__).resolve().parent.parent / "README.md"
    readme.write_text(replace_table(readme.read_text(), readme_table()))
    print(f"wrote the architecture table ({len(SERVED)} served, {len(REFUSED)} refused) into {readme}")
