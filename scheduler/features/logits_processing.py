"""Per-row logits processors, each a feature of the persistent batch, with the semantics and order of
`transformers`' LogitsProcessorList.

A `LogitsFeature` owns its per-row state, in the spirit of vLLM V1's `LogitsProcessor.update_state`: tensors
indexed by slot (`slot_tensors`; the batch moves them with their rows), written when a row joins (`add_row`),
and host-side facts rebuilt when rows join or leave (`refresh`, which also says whether any row uses it, so the
hot loop never asks the device). `apply` processes the whole batch's scores [B, V]: rows that don't use the
feature pass unchanged. `process_logits` is a loop over the features some row uses, in `LOGITS_FEATURES` order:
HF's (`GenerationMixin._get_logits_processor`: classifier-free guidance, repetition penalty, no-repeat n-gram,
bad words, min_new_tokens, allowed_token_ids where its prefix_allowed_tokens_fn runs), then the OpenAI-style
presence/frequency penalties and logit_bias (not in HF; after its processors, so unset they change nothing),
then a grammar constraint's mask and the request's custom processors. The sampling rows' warpers (temperature,
top-k, top-p, ...) come after these, in warpers.py.

A new processor is a `LogitsFeature` subclass (generate_processors.py for generate()'s own, request_processors.py
for the rest), an entry in `LOGITS_FEATURES` here, and its parameter in params.py and the proto.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from genserve.scheduler.features.generate_processors import (
    AllowedTokens,
    BadWords,
    ClassifierFreeGuidance,
    MinNewTokens,
    NoRepeatNgram,
    RepetitionPenalty,
)
from genserve.scheduler.features.logits_feature import LogitsFeature, LogitsStep
from genserve.scheduler.features.request_processors import (
    CustomProcessors,
    GrammarConstraint,
    LogitBias,
    PresenceFrequencyPenalties,
)

if TYPE_CHECKING:
    from genserve.scheduler.features.batch_state import BatchState


LOGITS_FEATURES: tuple[type[LogitsFeature], ...] = (
    ClassifierFreeGuidance,
    RepetitionPenalty,
    NoRepeatNgram,
    BadWords,
    MinNewTokens,
    AllowedTokens,
    PresenceFrequencyPenalties,
    LogitBias,
    GrammarConstraint,
    CustomProcessors,
)


def process_logits(scores: torch.Tensor, state: BatchState, step: LogitsStep) -> torch.Tensor:
    """Every processor some row uses, in order, on the whole batch (greedy and sampling rows alike); `scores`
    is [B, V] float32."""
    for feature in state.active_features:
        scores = feature.apply(scores, state, step)
    return scores


def process_later_positions(scores: torch.Tensor, state: BatchState) -> torch.Tensor:
    """The processors of speculating rows at their proposed positions ([B, K, V]): only masks and biases apply
    to such rows, and they are the same at every position."""
    for feature in state.active_features:
        if feature.applies_to_proposals:
            scores = feature.apply_at_proposals(scores, state)
    return scores
