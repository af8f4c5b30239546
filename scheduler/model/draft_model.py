"""The assistant (draft) model of speculative decoding (`--assistant-model`): a smaller model with the same
tokenizer proposes each row's next tokens greedily; the main model verifies them (speculation.py).

It keeps a slot KV cache of its own, rows in the same slots as the runner's. Each row's draft cache is valid up
to the position its last proposal consumed, capped by what the main model accepted; a step first catches every
row up (a new row prefills its prompt, alone), then proposes K tokens with K one-token passes for all rows.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from genserve.scheduler.features.batch_state import BatchState
from genserve.scheduler.features.logits_processing import process_later_positions
from genserve.scheduler.features.sampling import greedy_tokens
from genserve.scheduler.features.speculation import Drafts
from genserve.scheduler.kv.slot_cache import SlotKVCache, decode_pass, prefill_pass
from genserve.scheduler.model.loader import LoadedModel


class DraftModel:
    def __init__(self, model: PreTrainedModel, max_rows: int, max_context: int, spare_positions: int) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = SlotKVCache.for_model(model, max_rows, max_context, spare_positions)
        self.valid_until: list[int] = []  # per slot: draft KV positions [0, n) hold the row's tokens

    def add_row(self) -> None:
        self.valid_until.append(0)

    def move_rows(self, sources: list[int], destinations: list[int], num_rows: int) -> None:
        for source, destination in zip(sources, destinations):
            self.valid_until[destination] = self.valid_until[source]
        del self.valid_until[num_rows:]
        self.cache.move_rows(sources, destinations)

    def propose(self, state: BatchState, lengths: list[int], wanted: torch.Tensor, width: int) -> Drafts:
        """Up to `wanted[b]` (at most `width`) greedy proposals after each of the first len(lengths) rows, whose
        tokens are `state.history[b, :lengths[b]]`."""
        num_rows = len(lengths)
        # Proposals consumed last step are valid as far as the main model accepted them: up to its newest token.
        starts = [min(self.valid_until[row], length - 1) for row, length in enumerate(lengths)]
        for row, (start, length) in enumerate(zip(starts, lengths)):
            if start < length - 2:  # a new row: prefill all but its last two tokens, alone
                self._prefill(state, row, start, length - 2)
                starts[row] = length - 2
        # Every row now lacks one or two tokens, fed in one batched pass.
        catch_up = max(length - start for start, length in zip(starts, lengths))
        positions = torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(catch_up, device=self.device)
        tokens = state.history[:num_rows].gather(1, positions)
        logits = self._logits(state, tokens, positions, max(starts) + catch_up)
        last = torch.tensor([length - 1 - start for start, length in zip(starts, lengths)], device=self.device)
        proposal = greedy_tokens(logits[torch.arange(num_rows, device=self.device), last])
        proposals = [proposal]
        newest = torch.tensor(lengths, device=self.device) - 1
        for offset in range(1, width):
            position = (newest + offset).unsqueeze(1)
            proposal = greedy_tokens(self._logits(state, proposal.unsqueeze(1), position, max(lengths) + offset)[:, 0])
            proposals.append(proposal)
        # Consumed: each row's newest token and its first width - 1 proposals (valid as far as they are accepted).
        self.valid_until[:num_rows] = [length + width - 1 for length in lengths]
        return Drafts(torch.stack(proposals, dim=1), wanted.clamp(max=width))

    def _logits(
        self, state: BatchState, tokens: torch.Tensor, positions: torch.Tensor, read_length: int
    ) -> torch.Tensor:
        logits = decode_pass(self.model, self.cache, tokens, positions, read_length)
        return process_later_positions(logits.float(), state)

    def _prefill(self, state: BatchState, row: int, start: int, end: int) -> None:
        prefill_pass(self.model, self.cache, row, state.history[row : row + 1, start:end], offset=start)


def check_assistant(loaded: LoadedModel, assistant: LoadedModel) -> None:
    """A draft model must speak the same tokens: same vocabulary size and, where both have one, tokenizer."""
    sizes = [model.get_output_embeddings().weight.shape[0] for model in (loaded.model, assistant.model)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the assistant model's vocabulary ({sizes[1]}) differs from the model's ({sizes[0]})")
    if loaded.tokenizer is not None and assistant.tokenizer is not None:
        if loaded.tokenizer.get_vocab() != assistant.tokenizer.get_vocab():
            raise ValueError("the assistant model's tokenizer differs from the model's")
