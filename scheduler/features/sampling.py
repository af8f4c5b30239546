"""Choosing each row's next token: argmax for greedy rows, a multinomial draw for sampling rows.

A seeded request draws from its own `torch.Generator`, one draw per step exactly like `generate()` after
`torch.manual_seed(seed)`, so its tokens don't depend on who shares the batch. Unseeded rows are drawn together.
"""

from __future__ import annotations

import torch

from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.warpers import warp_for_sampling


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """The highest-scoring token along the last axis, as argmax picks it (`generate()`'s greedy choice)."""
    # max's indices are argmax's (the first of tied maxima, NaN counted as the largest), and torch's CPU kernel for
    # them is about three times faster (16 rows of a 49k vocabulary: 0.21 against 0.60 ms).
    return scores.max(dim=-1).indices


def select_tokens(
    scores: torch.Tensor, state: BatchState, shared_generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row, and the scores they were drawn from (the sampling rows' after the warpers)."""
    next_tokens = greedy_tokens(scores)
    if not state.sampling_rows:
        return next_tokens, scores
    rows = state.sampling_index
    warped = warp_for_sampling(scores[rows], state.warpers, rows)
    probs = torch.softmax(warped, dim=-1)
    generators = [state.generators[row] for row in state.sampling_rows]
    seeded = [i for i, g in enumerate(generators) if g is not None]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    sampled = torch.empty(len(generators), dtype=torch.long, device=scores.device)
    if unseeded:
        index = torch.tensor(unseeded, device=scores.device)
        sampled[index] = torch.multinomial(probs[index], num_samples=1, generator=shared_generator).squeeze(1)
    for i in seeded:
        sampled[i] = torch.multinomial(probs[i : i + 1], num_samples=1, generator=generators[i]).squeeze(1)
    next_tokens[rows] = sampled
    return next_tokens, scores.index_put((rows,), warped)
