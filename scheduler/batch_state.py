"""The persistent, slot-indexed batch: per-row parameter tensors and token history, written once when a row joins.

Rows occupy slots 0..B-1 in the order of `rows` (a request with classifier-free guidance holds two: its own and
its unconditional companion's). A row that leaves is replaced by the last row (see `compact`),
so every per-step computation works on the `[:B]` prefix of these tensors and nothing is rebuilt per step.
Host-side facts that select code paths (which rows sample, which have seeds) are recomputed only when the
composition changes, so the hot loop never asks the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.params import GenerationParameters
from scheduler.request import Sequence
from scheduler.speculation import can_speculate
from scheduler.warpers import SAMPLING_WARPERS, WarperRows


@dataclass
class MultiTokenBans:
    """Banned sequences longer than one token, flattened across rows: ban `last_token` when `prefix` just occurred."""

    row: torch.Tensor  # [P] row index
    prefix: torch.Tensor  # [P, K] right-aligned, padded with -1
    prefix_length: torch.Tensor  # [P]
    last_token: torch.Tensor  # [P]


class BatchState:
    def __init__(self, max_rows: int, vocab_size: int, capacity: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.vocab_size = vocab_size
        self.device = device
        self.rows: list[Sequence] = []
        self.generators: list[torch.Generator | None] = []

        def zeros(dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return torch.zeros((max_rows, *shape), dtype=dtype, device=device)

        self.warpers = [WarperRows(warper, max_rows, device) for warper in SAMPLING_WARPERS]
        self.repetition_penalty = zeros(torch.float32)
        self.no_repeat_ngram_size = zeros(torch.long)
        self.min_new_tokens = zeros(torch.long)
        self.max_new_tokens = zeros(torch.long)
        self.prompt_length = zeros(torch.long)
        self.stops_on_eos = zeros(torch.bool)
        self.seq_length = zeros(torch.long)  # prompt + generated tokens in `history`
        self.eos_mask = zeros(torch.bool, vocab_size)
        self.single_token_bans = zeros(torch.bool, vocab_size)
        self.allowed_tokens = zeros(torch.bool, vocab_size)  # rows with allowed_token_ids: only these
        self.token_counts = zeros(torch.int32, vocab_size)
        self.presence_penalty = zeros(torch.float32)
        self.frequency_penalty = zeros(torch.float32)
        self.lookup_tokens = zeros(torch.long)  # prompt-lookup proposals per step (0: the row does not speculate)
        self.assistant_tokens = zeros(torch.long)  # assistant-model proposals per step (rows not using lookup)
        self.history = zeros(torch.long, capacity)
        self._slot_tensors = [
            *(warper.values for warper in self.warpers),
            self.repetition_penalty,
            self.no_repeat_ngram_size,
            self.min_new_tokens,
            self.max_new_tokens,
            self.prompt_length,
            self.stops_on_eos,
            self.seq_length,
            self.eos_mask,
            self.single_token_bans,
            self.allowed_tokens,
            self.token_counts,
            self.presence_penalty,
            self.frequency_penalty,
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
        for warper in self.warpers:
            warper.add_row(slot, params)
        self.repetition_penalty[slot] = params.repetition_penalty
        self.no_repeat_ngram_size[slot] = params.no_repeat_ngram_size
        self.min_new_tokens[slot] = params.min_new_tokens
        self.max_new_tokens[slot] = params.max_new_tokens
        self.prompt_length[slot] = seq.num_prompt_tokens
        self.stops_on_eos[slot] = not params.ignore_eos
        self.presence_penalty[slot] = params.presence_penalty
        self.frequency_penalty[slot] = params.frequency_penalty
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
        self.single_token_bans[slot] = False
        self.single_token_bans[slot, _single_token_bans(seq)] = True
        self.allowed_tokens[slot] = not params.allowed_token_ids
        self.allowed_tokens[slot, list(params.allowed_token_ids)] = True
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

    def refresh_composition(self) -> None:
        """Recompute the host-side selectors of code paths; called only when rows join or leave."""
        self.request_slots = [slot for slot, seq in enumerate(self.rows) if not seq.is_companion]
        self.request_rows = [self.rows[slot] for slot in self.request_slots]
        slot_of = {id(seq): slot for slot, seq in enumerate(self.rows)}
        # A guided request's slot -> its unconditional companion's slot.
        self.companion_slots = {
            slot: slot_of[id(seq.companion)]
            for slot, seq in enumerate(self.rows)
            if seq.companion is not None and id(seq.companion) in slot_of
        }
        self.guidance = _guidance(self.rows, self.companion_slots, self.device)
        params = [seq.params for seq in self.rows]
        self.sampling_rows = [i for i, p in enumerate(params) if p.is_sampling]
        self.sampling_index = torch.tensor(self.sampling_rows, dtype=torch.long, device=self.device)
        self.uses_repetition_penalty = any(p.repetition_penalty != 1.0 for p in params)
        self.ngram_sizes = sorted({p.no_repeat_ngram_size for p in params if p.no_repeat_ngram_size > 0})
        self.uses_single_token_bans = any(len(b) == 1 for p in params for b in p.bad_words_ids)
        self.uses_min_new_tokens = any(p.min_new_tokens > 0 for p in params)
        self.uses_allowed_tokens = any(p.allowed_token_ids for p in params)
        speculation = [_speculation(seq) for seq in self.rows]
        self.max_lookup_tokens = max((lookup for lookup, _ in speculation), default=0)
        self.max_assistant_tokens = max((assistant for _, assistant in speculation), default=0)
        self.constrained_rows = [i for i, seq in enumerate(self.rows) if seq.grammar is not None]
        wanted = [s.options.top_logprobs for s in self.rows if s.options.top_logprobs is not None]
        self.max_top_logprobs = max(wanted, default=-1)
        processed = [s.options.processed_logprobs for s in self.rows]
        self.processed_logprob_rows = torch.tensor(processed, device=self.device) if any(processed) else None
        self.multi_token_bans = _multi_token_bans(self.rows, self.device)
        self.uses_custom_processors = any(seq.custom_processors for seq in self.rows)
        self.uses_custom_criteria = any(seq.custom_criteria for seq in self.rows)
        self.uses_output_penalties = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.logit_bias = _logit_bias(params, self.device)
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


def _bad_words(seq: Sequence) -> list[tuple[int, ...]]:
    # HF's NoBadWordsLogitsProcessor drops a banned sequence that is just an eos token.
    eos = seq.params.eos_token_id
    return [b for b in seq.params.bad_words_ids if not (len(b) == 1 and b[0] in eos)]


def _single_token_bans(seq: Sequence) -> list[int]:
    return [b[0] for b in _bad_words(seq) if len(b) == 1]


def _multi_token_bans(rows: list[Sequence], device: torch.device) -> MultiTokenBans | None:
    entries = [(i, b) for i, seq in enumerate(rows) for b in _bad_words(seq) if len(b) > 1]
    if not entries:
        return None
    width = max(len(b) - 1 for _, b in entries)
    prefixes = [[-1] * (width - len(b) + 1) + list(b[:-1]) for _, b in entries]
    return MultiTokenBans(
        row=torch.tensor([i for i, _ in entries], device=device),
        prefix=torch.tensor(prefixes, dtype=torch.long, device=device),
        prefix_length=torch.tensor([len(b) - 1 for _, b in entries], device=device),
        last_token=torch.tensor([b[-1] for _, b in entries], device=device),
    )


@dataclass
class Guidance:
    """Classifier-free guidance pairs: the logits of row `guided` are steered away from those of `companion`."""

    guided: torch.Tensor
    companion: torch.Tensor
    scale: torch.Tensor  # [G, 1]


def _guidance(rows: list[Sequence], companion_slots: dict[int, int], device: torch.device) -> Guidance | None:
    if not companion_slots:
        return None
    guided, companion = zip(*companion_slots.items())
    scale = [rows[slot].params.guidance_scale for slot in guided]
    return Guidance(
        guided=torch.tensor(guided, device=device),
        companion=torch.tensor(companion, device=device),
        scale=torch.tensor(scale, dtype=torch.float32, device=device).unsqueeze(1),
    )


@dataclass
class LogitBias:
    """Every row's logit_bias entries, flattened: add `bias` to scores[row, token]."""

    row: torch.Tensor
    token: torch.Tensor
    bias: torch.Tensor


def _logit_bias(params: list[GenerationParameters], device: torch.device) -> LogitBias | None:
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
    if not entries:
        return None
    rows, tokens, biases = zip(*entries)
    return LogitBias(
        row=torch.tensor(rows, device=device),
        token=torch.tensor(tokens, device=device),
        bias=torch.tensor(biases, dtype=torch.float32, device=device),
    )
