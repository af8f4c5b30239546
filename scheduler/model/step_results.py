"""From a step's picks to each row's result: tokens cut at eos and length limits (stop codes decided on the
device), the logprob columns of the step's one host copy, each row's share of that copy, and the constrained
rows' matchers advanced by their tokens."""

from __future__ import annotations

import dataclasses

import torch

from genserve.scheduler.core.request import Sequence, TokenLogprob
from genserve.scheduler.core.step_plan import RowResult, StopCode
from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.constraints import advance


def limit_tokens(
    state: BatchState, emitted: torch.Tensor, counts: torch.Tensor, max_context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row's emitted tokens at its first eos and at its length limits; returns the counts kept and
    the stop codes."""
    num_rows, width = emitted.shape[0], emitted.shape[1]
    offsets = torch.arange(width, device=emitted.device)
    is_eos = state.eos_mask[:num_rows].gather(1, emitted) & state.stops_on_eos[:num_rows].unsqueeze(1)
    is_eos &= offsets < counts.unsqueeze(1)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), width)
    lengths = state.seq_length[:num_rows]
    room = torch.minimum(
        state.max_new_tokens[:num_rows] - (lengths - state.prompt_length[:num_rows]),
        max_context - lengths,
    )
    hits_eos = first_eos + 1 <= torch.minimum(counts, room)
    counts = torch.where(hits_eos, first_eos + 1, torch.minimum(counts, room))
    hits_length = counts >= room
    stops = torch.where(
        hits_eos, int(StopCode.EOS_TOKEN), torch.where(hits_length, int(StopCode.LENGTH), int(StopCode.RUNNING))
    )
    return counts, stops


def logprob_columns(scores: torch.Tensor, next_tokens: torch.Tensor, num_top: int) -> list[torch.Tensor]:
    logprobs = torch.log_softmax(scores, dim=-1)
    chosen = logprobs.gather(1, next_tokens.unsqueeze(1))
    rank = (logprobs > chosen).sum(dim=1, keepdim=True) + 1
    if num_top == 0:
        return [chosen.double(), rank.double()]
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return [chosen.double(), rank.double(), top_ids.double(), top_values.double()]


def row_result(seq: Sequence, values: list[float], width: int, num_top: int) -> RowResult:
    """One row of the host copy: count, stop, proposed, accepted, `width` tokens, then any logprobs (the
    chosen token's, its rank, the top ids and their logprobs)."""
    count, code = int(values[0]), StopCode(int(values[1]))
    tokens = tuple(int(token) for token in values[4 : 4 + count])
    wanted = seq.options.top_logprobs
    if wanted is None:
        return RowResult(tokens, code)
    chosen, rank, rest = values[4 + width], int(values[5 + width]), values[6 + width :]
    ids, logprobs = rest[:num_top], rest[num_top:]
    top = tuple((int(i), lp) for i, lp in zip(ids[:wanted], logprobs[:wanted]))
    return RowResult(tokens, code, TokenLogprob(tokens[0], chosen, top, rank))


def advance_constraints(state: BatchState, results: list[RowResult], row_errors: dict[int, str]) -> list[RowResult]:
    """Feed each constrained row's token to its matcher; a complete constraint ends the row."""
    results = list(results)
    for slot in state.constrained_rows:
        result = results[slot]
        if result.stop is not StopCode.RUNNING or slot in row_errors:
            continue  # the row ends here anyway
        try:
            if advance(state.rows[slot].grammar, result.token_ids[0]):
                results[slot] = dataclasses.replace(result, stop=StopCode.CONSTRAINT_COMPLETE)
        except RuntimeError as error:
            row_errors[slot] = str(error)
    return results
