"""The persistent, slot-indexed batch: each row's token history and stop limits, and its per-row features (the
logits processors of logits_processing.py and the warpers of warpers.py), written once when a row joins.

Rows occupy slots 0..B-1 in the order of `rows` (a request with classifier-free guidance holds two: its own and
its unconditional companion's). A row that leaves is replaced by the last row (see `remove_rows`), which moves
every slot tensor, the features' included, so every per-step computation works on the `[:B]` prefix of these
tensors and nothing is rebuilt per step. Host-side facts that select code paths (which features and warpers
some row uses, which rows sample, which have seeds) are recomputed only when the composition changes, so the
hot loop never asks the device.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from genserve.scheduler.core.request import Sequence
from genserve.scheduler.features.generate_processors import ClassifierFreeGuidance
from genserve.scheduler.features.logits_feature import LogitsFeature
from genserve.scheduler.features.logits_processing import LOGITS_FEATURES
from genserve.scheduler.features.request_processors import GrammarConstraint
from genserve.scheduler.features.speculation import can_speculate
from genserve.scheduler.features.warpers import SAMPLING_WARPERS, WarperRows

LogitsFeatureT = TypeVar("LogitsFeatureT", bound=LogitsFeature)


class BatchState:
    def __init__(self, max_rows: int, vocab_size: int, capacity: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.rows: list[Sequence] = []
        self.generators: list[torch.Generator | None] = []

        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros((max_rows, *shape), dtype=dtype, device=device)

        self.logits_features = [feature(max_rows, vocab_size, device) for feature in LOGITS_FEATURES]
        self.warpers = [WarperRows(warper, max_rows, device) for warper in SAMPLING_WARPERS]
        self.max_new_tokens = zeros(torch.long)
        self.prompt_length = zeros(torch.long)
        self.stops_on_eos = zeros(torch.bool)
        self.seq_length = zeros(torch.long)  # prompt + generated tokens in `history`
        self.eos_mask = zeros(torch.bool, vocab_size)
        self.token_counts = zeros(torch.int32, vocab_size)
        self.lookup_tokens = zeros(torch.long)  # prompt-lookup proposals per step (0: the row does not speculate)
        self.assistant_tokens = zeros(torch.long)  # assistant-model proposals per step (rows not using lookup)
        self.history = zeros(torch.long, capacity)
        self._slot_tensors = [
            *(tensor for feature in self.logits_features for tensor in feature.slot_tensors),
            *(warper.values for warper in self.warpers),
            self.max_new_tokens,
            self.prompt_length,
            self.stops_on_eos,
            self.seq_length,
            self.eos_mask,
            self.token_counts,
            self.lookup_tokens,
            self.assistant_tokens,
        ]
        self.refresh_composition()

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def ensure_capacity(self, num_positions: int) -> None:
        if num_positions > self.history.shape[1]:
            grown = torch.zeros((self.max_rows, num_positions), dtype=torch.long, device=self.device)
            grown[:, : self.history.shape[1]] = self.history
            self.history = grown

    def add_row(self, seq: Sequence) -> int:
        slot = len(self.rows)
        params = seq.params
        for feature in self.logits_features:
            feature.add_row(slot, seq)
        for warper in self.warpers:
            warper.add_row(slot, params)
        self.max_new_tokens[slot] = params.max_new_tokens
        self.prompt_length[slot] = seq.num_prompt_tokens
        self.stops_on_eos[slot] = not params.ignore_eos
        lookup, assistant = _speculation(seq)
        self.lookup_tokens[slot] = lookup
        self.assistant_tokens[slot] = assistant
        tokens = seq.prompt_ids + seq.generated_ids
        self.seq_length[slot] = len(tokens)
        self.ensure_capacity(len(tokens) + 1)
        token_tensor = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self.history[slot, : len(tokens)] = token_tensor
        self.token_counts[slot] = torch.bincount(token_tensor, minlength=self.vocab_size).to(torch.int32)
        self.eos_mask[slot] = False
        self.eos_mask[slot, list(params.eos_token_id)] = True
        self.rows.append(seq)
        if seq.sampler_generator is None:
            seq.sampler_generator = _seeded_generator(params.seed, self.device)
        self.generators.append(seq.sampler_generator)
        return slot

    def remove_rows(self, leaving: set[int]) -> tuple[list[int], list[int]]:
        """Drop rows, filling holes with the last rows; returns the (sources, destinations) slot moves made."""
        survivors = [i for i in range(self.num_rows) if i not in leaving]
        new_count = len(survivors)
        holes = [i for i in range(new_count) if i in leaving]
        movers = [i for i in survivors if i >= new_count]
        order = list(range(self.num_rows))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        self.rows = [self.rows[i] for i in order[:new_count]]
        self.generators = [self.generators[i] for i in order[:new_count]]
        if movers:
            sources = torch.tensor(movers, device=self.device)
            destinations = torch.tensor(holes, device=self.device)
            for tensor in [*self._slot_tensors, self.history]:
                tensor[destinations] = tensor[sources]
        return movers, holes

    def record_tokens(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Append the first `counts[b]` of `tokens[b]` ([B, W]) to each row's history and token counts
        (device-side, no sync: positions past a row's count are rewritten with what they held)."""
        num_rows, width = tokens.shape
        keep = torch.arange(width, device=self.device) < counts.unsqueeze(1)
        positions = self.seq_length[:num_rows].unsqueeze(1) + torch.arange(width, device=self.device)
        history = self.history[:num_rows]
        history.scatter_(1, positions, torch.where(keep, tokens, history.gather(1, positions)))
        row_index = torch.arange(num_rows, device=self.device).unsqueeze(1).expand(-1, width)
        self.token_counts[:num_rows].index_put_((row_index, tokens), keep.to(torch.int32), accumulate=True)
        self.seq_length[:num_rows] += counts

    def feature(self, kind: type[LogitsFeatureT]) -> LogitsFeatureT:
        return next(feature for feature in self.logits_features if type(feature) is kind)

    def refresh_composition(self) -> None:
        """Recompute the host-side selectors of code paths; called only when rows join or leave."""
        self.request_rows = [seq for seq in self.rows if not seq.is_companion]
        for feature in self.logits_features:
            feature.is_used = feature.refresh(self.rows)
        self.active_features = [feature for feature in self.logits_features if feature.is_used]
        self.guidance = self.feature(ClassifierFreeGuidance).pairs
        self.constrained_rows = self.feature(GrammarConstraint).rows
        params = [seq.params for seq in self.rows]
        self.sampling_rows = [i for i, p in enumerate(params) if p.is_sampling]
        self.sampling_index = torch.tensor(self.sampling_rows, dtype=torch.long, device=self.device)
        speculation = [_speculation(seq) for seq in self.rows]
        self.max_lookup_tokens = max((lookup for lookup, _ in speculation), default=0)
        self.max_assistant_tokens = max((assistant for _, assistant in speculation), default=0)
        wanted = [s.options.top_logprobs for s in self.rows if s.options.top_logprobs is not None]
        self.max_top_logprobs = max(wanted, default=-1)
        processed = [s.options.processed_logprobs for s in self.rows]
        self.processed_logprob_rows = torch.tensor(processed, device=self.device) if any(processed) else None
        self.uses_custom_criteria = any(seq.custom_criteria for seq in self.rows)
        sampled = [params[i] for i in self.sampling_rows]
        for warper in self.warpers:
            warper.refresh(sampled)


def _speculation(seq: Sequence) -> tuple[int, int]:
    """Tokens the row proposes per step by prompt lookup and by the assistant model (lookup wins if both)."""
    if not can_speculate(seq):
        return 0, 0
    lookup = seq.params.prompt_lookup_num_tokens
    return lookup, 0 if lookup else seq.params.num_assistant_tokens or 0


def _seeded_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
