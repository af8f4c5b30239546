"""The sampling warpers, each a per-row feature: temperature, top-h, top-k, top-p, min-p, typical-p, epsilon, eta.

A `Warper` says which request parameter it reads, when a row uses it, and how it warps a batch of sampling rows
given each row's value (rows that don't use it pass through unchanged). `SAMPLING_WARPERS` lists them in HF's
order (`GenerationMixin._get_logits_processor`). The batch keeps one `WarperRows` per warper: its values by
slot, written when a row joins and moved with it, and whether any sampling row uses it (decided when rows join
or leave, so the hot loop never asks the device). A new sampling parameter is a field in params.py, a field in
the proto, and an entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from genserve.scheduler.core.params import GenerationParameters

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Warper:
    name: str
    value: Callable[[GenerationParameters], float]  # the row's value (what makes the warper an identity, if unused)
    uses: Callable[[GenerationParameters], bool]
    # (scores [S, V], values [S], the largest value among the rows that use it) -> warped scores
    warp: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class WarperRows:
    """A warper's per-row state in the persistent batch."""

    def __init__(self, warper: Warper, max_rows: int, device: torch.device) -> None:
        self.warper = warper
        self.values = torch.zeros(max_rows, dtype=torch.float32, device=device)
        self.is_used = False
        self.largest = 0.0

    def add_row(self, slot: int, params: GenerationParameters) -> None:
        self.values[slot] = self.warper.value(params)

    def refresh(self, sampling: list[GenerationParameters]) -> None:
        used = [self.warper.value(params) for params in sampling if self.warper.uses(params)]
        self.is_used, self.largest = bool(used), max(used, default=0.0)

    def apply(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.warper.warp(scores, self.values[rows], self.largest)


def warp_for_sampling(scores: torch.Tensor, warpers: list[WarperRows], rows: torch.Tensor) -> torch.Tensor:
    """The warpers some sampling row uses, in order, on the sampling rows `rows` (their scores given, [S, V])."""
    for warper in warpers:
        if warper.is_used:
            scores = warper.apply(scores, rows)
    return scores


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor, _: float) -> torch.Tensor:
    return scores / temperature.unsqueeze(1)


def apply_top_h(scores: torch.Tensor, top_h: torch.Tensor, _: float, top_n: int = 100) -> torch.Tensor:
    """HF's TopHLogitsWarper per row: among the `top_n` best tokens, keep them in order while their cumulative
    entropy stays within top_h times the entropy of those `top_n` (the best always kept); top_h 0 keeps all."""
    top_logits, top_ids = torch.topk(scores, min(top_n, scores.shape[1]), dim=-1)
    distribution = torch.distributions.Categorical(logits=top_logits)
    probs = distribution.probs
    cumulative = torch.cumsum(-probs * torch.log(probs), dim=-1)
    selected = cumulative <= (distribution.entropy() * top_h).unsqueeze(-1)
    selected[:, 0] = True
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_ids, selected)
    keep |= (top_h <= 0).unsqueeze(1)
    return scores.masked_fill(~keep, NEG_INF)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: float) -> torch.Tensor:
    """Keep the k best tokens per row; k = 0 disables it for that row."""
    top_k = top_k.long()
    largest = torch.topk(scores, min(int(max_top_k), scores.shape[1]), dim=1).values
    kth_index = (top_k.clamp(min=1, max=largest.shape[1]) - 1).unsqueeze(1)
    threshold = largest.gather(1, kth_index)
    remove = (scores < threshold) & (top_k > 0).unsqueeze(1)
    return scores.masked_fill(remove, NEG_INF)


def apply_top_p(scores: torch.Tensor, cutoff: torch.Tensor, _: float) -> torch.Tensor:
    """Nucleus filtering; `cutoff` is 1 - top_p per row (0 disables it)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= cutoff.unsqueeze(1)
    remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, NEG_INF)


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor, _: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the best token's probability; min_p = 0 keeps every token."""
    probs = torch.softmax(scores, dim=-1)
    top_probs = probs.amax(dim=-1, keepdim=True)
    remove = probs < min_p.unsqueeze(1) * top_probs
    remove.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, NEG_INF)


def apply_typical_p(scores: torch.Tensor, mass: torch.Tensor, _: float) -> torch.Tensor:
    """Locally typical sampling; mass 1.0 disables it for that row."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    probs = torch.exp(normalized)
    entropy = -(normalized * probs).nansum(-1, keepdim=True)
    shifted = torch.abs((-normalized) - entropy)
    sorted_shifted, sorted_indices = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
    last_index = (cumulative < mass.unsqueeze(1)).sum(dim=1).clamp(max=sorted_shifted.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(1, last_index.view(-1, 1))
    remove_sorted[:, :1] = False  # min_tokens_to_keep = 1
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted) & (mass < 1.0).unsqueeze(1)
    return scores.masked_fill(remove, NEG_INF)


def apply_epsilon_cutoff(scores: torch.Tensor, epsilon: torch.Tensor, _: float) -> torch.Tensor:
    """HF's EpsilonLogitsWarper per row: drop tokens less likely than epsilon, keeping the most likely one."""
    remove = scores.softmax(dim=-1) < _active(epsilon).unsqueeze(1)
    remove &= scores < scores.amax(dim=-1, keepdim=True)
    return scores.masked_fill(remove, NEG_INF)


def apply_eta_cutoff(scores: torch.Tensor, epsilon: torch.Tensor, _: float) -> torch.Tensor:
    """HF's EtaLogitsWarper per row: the cutoff is min(epsilon, sqrt(epsilon) * exp(-entropy)); 0 keeps all."""
    epsilon = _active(epsilon)
    entropy = torch.distributions.Categorical(logits=scores).entropy()
    eta = torch.minimum(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy)).unsqueeze(1)
    remove = (scores.softmax(dim=-1) < eta) & (scores < scores.amax(dim=-1, keepdim=True))
    return scores.masked_fill(remove, NEG_INF)


def _active(cutoff: torch.Tensor) -> torch.Tensor:
    """A cutoff of 1 (allowed, but generate() skips the warper for it) removes nothing, like 0."""
    return torch.where(cutoff < 1.0, cutoff, torch.zeros_like(cutoff))


def _cutoff_in_use(value: float) -> bool:
    return 0.0 < value < 1.0  # as generate(): a cutoff applies when 0 < cutoff < 1


SAMPLING_WARPERS: tuple[Warper, ...] = (
    Warper("temperature", lambda p: p.temperature, lambda p: p.temperature != 1.0, apply_temperature),
    Warper("top_h", lambda p: p.top_h or 0.0, lambda p: p.top_h is not None, apply_top_h),
    Warper("top_k", lambda p: p.top_k, lambda p: p.top_k > 0, apply_top_k),
    # Stored as HF compares it, (1 - top_p) rounded once, so borderline tokens fall on the same side.
    Warper("top_p", lambda p: 1.0 - p.top_p, lambda p: p.top_p < 1.0, apply_top_p),
    Warper("min_p", lambda p: p.min_p or 0.0, lambda p: p.min_p is not None, apply_min_p),
    Warper("typical_p", lambda p: p.typical_p, lambda p: p.typical_p < 1.0, apply_typical_p),
    Warper(
        "epsilon_cutoff", lambda p: p.epsilon_cutoff, lambda p: _cutoff_in_use(p.epsilon_cutoff), apply_epsilon_cutoff
    ),
    Warper("eta_cutoff", lambda p: p.eta_cutoff, lambda p: _cutoff_in_use(p.eta_cutoff), apply_eta_cutoff),
)
