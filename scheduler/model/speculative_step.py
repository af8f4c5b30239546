"""A speculating step's two ends: the proposals of the running rows (prompt lookup, the draft model), and the
model's verdict on them (its own picks at every proposed position, kept as far as they agree, plus one)."""

from __future__ import annotations

import torch

from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.logits_processing import process_later_positions
from genserve.scheduler.features.sampling import greedy_tokens
from genserve.scheduler.features.speculation import Drafts, accepted_counts, merge_drafts, prompt_lookup
from genserve.scheduler.model.draft_model import DraftModel


def propose(state: BatchState, draft: DraftModel | None, num_rows: int) -> Drafts | None:
    """This step's proposals for the running rows, or None when none of them speculates."""
    lookup_width, assistant_width = state.max_lookup_tokens, state.max_assistant_tokens if draft else 0
    if not (lookup_width or assistant_width):
        return None
    lengths = [seq.num_tokens for seq in state.rows[:num_rows]]
    state.ensure_capacity(max(lengths) + 1 + max(lookup_width, assistant_width))
    proposals = []
    if lookup_width:
        history = state.history[:num_rows, : max(lengths)]
        proposals.append(
            prompt_lookup(history, state.seq_length[:num_rows], state.lookup_tokens[:num_rows], lookup_width)
        )
    if assistant_width:
        proposals.append(draft.propose(state, lengths, state.assistant_tokens[:num_rows], assistant_width))
    return merge_drafts(proposals)


def verify(
    state: BatchState, drafts: Drafts, decode_logits: torch.Tensor, next_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The speculating rows' tokens: the model's picks at every proposed position, as many as it agreed
    with plus one. Rows past the decoding ones (prefilled this step) keep their single pick."""
    later = decode_logits[:, 1:].float()
    num_decoding = later.shape[0]
    picks = torch.cat([next_tokens[:num_decoding, None], greedy_tokens(process_later_positions(later, state))], 1)
    accepted = accepted_counts(drafts, picks)
    emitted = next_tokens.unsqueeze(1).repeat(1, picks.shape[1])
    emitted[:num_decoding] = picks
    padding = torch.zeros(next_tokens.shape[0] - num_decoding, dtype=torch.long, device=next_tokens.device)
    accepted, proposed = torch.cat([accepted, padding]), torch.cat([drafts.counts, padding])
    return emitted, 1 + accepted, proposed, accepted
