"""Per-row generation features: logits processors, sampling warpers, constraints, custom plugins, sampling,
speculative decoding and the draft model. Each feature keeps its per-row parameters as tensors by slot and is
applied batched; imports the core's types and the KV room, never the engine loop."""
