"""Speculative decoding for greedy rows: cheap guesses of the next tokens, verified by the model in one pass.

A step feeds each speculating row its last token plus K proposed tokens; the logits at every position say what
greedy decoding would pick there, so the longest run of proposals equal to those picks is accepted, and the pick
after it comes free. The tokens are exactly plain greedy decoding's: a proposal only decides how many of them
one forward pass yields. Proposals come from prompt lookup (the tokens that followed the latest earlier
occurrence of the row's last n-gram, as `generate(prompt_lookup_num_tokens=...)` does) or from a draft model
(`draft_model.py`). Everything here is batched over rows and stays on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from genserve.scheduler.core.request import Sequence

MAX_LOOKUP_NGRAM = 3


def can_speculate(seq: Sequence) -> bool:
    """Rows whose every per-step hook is position-independent; the others decode one token per step."""
    return (
        seq.params.allows_speculation
        and not seq.is_companion
        and seq.grammar is None
        and not seq.custom_processors
        and not seq.custom_criteria
        and seq.options.top_logprobs is None
    )


@dataclass(frozen=True)
class Drafts:
    """Proposed tokens for the first rows of the batch: `tokens[b, :counts[b]]` (the rest is padding)."""

    tokens: torch.Tensor  # [B, K]
    counts: torch.Tensor  # [B]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


def prompt_lookup(history: torch.Tensor, lengths: torch.Tensor, wanted: torch.Tensor, width: int) -> Drafts:
    """For each row, find the latest earlier occurrence of its last n tokens (n = 3, 2, then 1) and propose the
    (up to `wanted[b]`) tokens that followed it. `history` is [B, T] with row b's tokens in [:lengths[b]]."""
    num_rows, num_positions = history.shape
    device = history.device
    found = torch.zeros(num_rows, dtype=torch.bool, device=device)
    follow_start = torch.zeros(num_rows, dtype=torch.long, device=device)
    for ngram in range(MAX_LOOKUP_NGRAM, 0, -1):
        if num_positions <= ngram:
            continue
        tail_positions = (lengths.unsqueeze(1) - ngram + torch.arange(ngram, device=device)).clamp(min=0)
        tail = history.gather(1, tail_positions)  # [B, n]
        windows = history.unfold(1, ngram, 1)  # [B, W, n]
        starts = torch.arange(windows.shape[1], device=device)
        # An earlier occurrence, with at least one token after it that is not the tail itself.
        matches = (windows == tail.unsqueeze(1)).all(dim=2) & (starts.unsqueeze(0) < (lengths - ngram).unsqueeze(1))
        matches &= (lengths >= ngram + 1).unsqueeze(1)
        latest = (matches * (starts + 1)).amax(dim=1) - 1  # -1: none
        use = ~found & (latest >= 0)
        follow_start = torch.where(use, latest + ngram, follow_start)
        found |= use
    positions = (follow_start.unsqueeze(1) + torch.arange(width, device=device)).clamp(max=num_positions - 1)
    tokens = history.gather(1, positions)
    available = (lengths - follow_start).clamp(min=0)
    counts = torch.where(found, torch.minimum(wanted, available), 0).clamp(max=width)
    return Drafts(tokens, counts)


def merge_drafts(proposals: list[Drafts]) -> Drafts:
    """One set of proposals from several sources, each row taking its own (a row proposes from one source)."""
    if len(proposals) == 1:
        return proposals[0]
    width = max(drafts.width for drafts in proposals)
    tokens = torch.zeros_like(proposals[0].tokens[:, :1]).expand(-1, width).clone()
    counts = torch.zeros_like(proposals[0].counts)
    for drafts in proposals:
        uses = (drafts.counts > 0).unsqueeze(1)
        tokens[:, : drafts.width] = torch.where(uses, drafts.tokens, tokens[:, : drafts.width])
        counts = torch.maximum(counts, drafts.counts)
    return Drafts(tokens, counts)


def accepted_counts(drafts: Drafts, picks: torch.Tensor) -> torch.Tensor:
    """How many leading proposals equal the model's picks: `picks[b, j]` is the greedy token after the row's
    last token and its first j proposals."""
    positions = torch.arange(drafts.width, device=picks.device)
    matches = (drafts.tokens == picks[:, : drafts.width]) & (positions < drafts.counts.unsqueeze(1))
    return matches.long().cumprod(dim=1).sum(dim=1)
