"""Batched, per-row logits processing with the semantics and order of `transformers`' LogitsProcessorList.

Every function takes the whole batch with per-row parameter tensors from `BatchState`; rows that don't use a
processor pass through unchanged, and a processor no running row needs is skipped. Order (as in
`GenerationMixin._get_logits_processor`): classifier-free guidance, repetition penalty, no-repeat n-gram, bad
words, min_new_tokens, allowed_token_ids (where HF's prefix_allowed_tokens_fn runs); then the OpenAI-style
presence/frequency penalties and logit_bias (not in HF; after its processors, so unset they change nothing).
The sampling rows' warpers (temperature, top-k, top-p, ...) come after these, in warpers.py.
"""

from __future__ import annotations

import torch

from scheduler.batch_state import BatchState

NEG_INF = float("-inf")


def process_logits(scores: torch.Tensor, state: BatchState, max_seq_length: int) -> torch.Tensor:
    """Processors that apply to every row (greedy and sampling alike). `scores` is [B, V] float32."""
    num_rows = scores.shape[0]
    if state.guidance is not None:
        scores = apply_classifier_free_guidance(scores, state)
    if state.uses_repetition_penalty:
        scores = apply_repetition_penalty(scores, state.token_counts[:num_rows], state.repetition_penalty[:num_rows])
    for ngram_size in state.ngram_sizes:
        scores = apply_no_repeat_ngram(scores, state, ngram_size, max_seq_length)
    if state.uses_single_token_bans:
        scores = scores.masked_fill(state.single_token_bans[:num_rows], NEG_INF)
    if state.multi_token_bans is not None:
        scores = apply_multi_token_bans(scores, state)
    if state.uses_min_new_tokens:
        generated = state.seq_length[:num_rows] - state.prompt_length[:num_rows]
        too_early = (generated < state.min_new_tokens[:num_rows]).unsqueeze(1)
        scores = scores.masked_fill(too_early & state.eos_mask[:num_rows], NEG_INF)
    if state.uses_allowed_tokens:
        scores = scores.masked_fill(~state.allowed_tokens[:num_rows], NEG_INF)
    if state.uses_output_penalties:
        scores = apply_presence_frequency_penalties(scores, state, max_seq_length)
    if state.logit_bias is not None:
        bias = state.logit_bias
        scores = scores.index_put((bias.row, bias.token), bias.bias, accumulate=True)
    return scores


def process_later_positions(scores: torch.Tensor, state: BatchState) -> torch.Tensor:
    """The processors of speculating rows at their proposed positions ([B, K, V]): only masks and biases apply
    to such rows (see `GenerationParameters.allows_speculation`), and they are the same at every position."""
    num_rows = scores.shape[0]
    if state.uses_single_token_bans:
        scores = scores.masked_fill(state.single_token_bans[:num_rows].unsqueeze(1), NEG_INF)
    if state.uses_allowed_tokens:
        scores = scores.masked_fill(~state.allowed_tokens[:num_rows].unsqueeze(1), NEG_INF)
    if state.logit_bias is not None:
        bias = state.logit_bias
        dense = torch.zeros(state.num_rows, scores.shape[2], device=scores.device)
        dense.index_put_((bias.row, bias.token), bias.bias, accumulate=True)
        scores = scores + dense[:num_rows].unsqueeze(1)
    return scores


def apply_classifier_free_guidance(scores: torch.Tensor, state: BatchState) -> torch.Tensor:
    """HF's UnbatchedClassifierFreeGuidanceLogitsProcessor with the unconditional branch as a companion row:
    guided = scale * (log_softmax(conditional) - log_softmax(unconditional)) + log_softmax(unconditional)."""
    guidance = state.guidance
    conditional = torch.log_softmax(scores[guidance.guided], dim=-1)
    unconditional = torch.log_softmax(scores[guidance.companion], dim=-1)
    guided = guidance.scale * (conditional - unconditional) + unconditional
    return scores.index_put((guidance.guided,), guided)


def apply_repetition_penalty(scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Every token already in the sequence (prompt included) is penalised once; penalty 1.0 is the identity."""
    penalty = penalty.unsqueeze(1)
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(counts > 0, penalised, scores)


def apply_no_repeat_ngram(
    scores: torch.Tensor, state: BatchState, ngram_size: int, max_seq_length: int
) -> torch.Tensor:
    """Ban each token that would complete an n-gram already present, for rows whose no_repeat_ngram_size is n."""
    num_rows = scores.shape[0]
    if max_seq_length < ngram_size:
        return scores
    history = state.history[:num_rows, :max_seq_length]
    lengths = state.seq_length[:num_rows]
    windows = history.unfold(1, ngram_size, 1)  # [B, W, n]: every n-gram start
    prefix_len = ngram_size - 1
    prefix_positions = (lengths.unsqueeze(1) - prefix_len + torch.arange(prefix_len, device=scores.device)).clamp(min=0)
    current_prefix = history.gather(1, prefix_positions)  # the last n-1 tokens of each row
    matches = (windows[:, :, :prefix_len] == current_prefix.unsqueeze(1)).all(dim=2)
    starts = torch.arange(windows.shape[1], device=scores.device)
    inside = starts.unsqueeze(0) + ngram_size <= lengths.unsqueeze(1)
    applies = (state.no_repeat_ngram_size[:num_rows] == ngram_size).unsqueeze(1)
    hits = (matches & inside & applies).to(torch.int32)
    banned = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(1, windows[:, :, prefix_len], hits)
    return scores.masked_fill(banned > 0, NEG_INF)


def apply_presence_frequency_penalties(scores: torch.Tensor, state: BatchState, max_seq_length: int) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens (not the prompt): logit -= frequency * count + presence * seen."""
    num_rows = scores.shape[0]
    history = state.history[:num_rows, :max_seq_length]
    positions = torch.arange(max_seq_length, device=scores.device).unsqueeze(0)
    generated = (positions >= state.prompt_length[:num_rows].unsqueeze(1)) & (
        positions < state.seq_length[:num_rows].unsqueeze(1)
    )
    counts = torch.zeros_like(scores).scatter_add_(1, history, generated.to(scores.dtype))
    frequency = state.frequency_penalty[:num_rows].unsqueeze(1)
    presence = state.presence_penalty[:num_rows].unsqueeze(1)
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_multi_token_bans(scores: torch.Tensor, state: BatchState) -> torch.Tensor:
    """Ban the last token of a banned sequence when the tokens before it end the row's sequence."""
    bans = state.multi_token_bans
    width = bans.prefix.shape[1]
    lengths = state.seq_length[bans.row]
    positions = (lengths.unsqueeze(1) - width + torch.arange(width, device=scores.device)).clamp(min=0)
    tails = state.history[bans.row].gather(1, positions)
    matches = ((tails == bans.prefix) | (bans.prefix < 0)).all(dim=1) & (lengths > bans.prefix_length)
    banned = torch.zeros_like(scores).index_put_((bans.row, bans.last_token), matches.to(scores.dtype), accumulate=True)
    return scores.masked_fill(banned > 0, NEG_INF)
