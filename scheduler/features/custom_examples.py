"""Example custom components for `--logits-processor` / `--stopping-criteria`: plain HF-compatible classes.

    genserve serve --logits-processor ban=genserve.scheduler.features.custom_examples:BannedPhrasesLogitsProcessor \\
                   --stopping-criteria sentences=genserve.scheduler.features.custom_examples:MaxSentencesCriteria

A request then enables them by name with JSON arguments, e.g. `{"phrases": [[1234, 567]]}` or
`{"max_sentences": 2, "sentence_end_ids": [30, 17]}`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, StoppingCriteria


class BannedPhrasesLogitsProcessor(LogitsProcessor):
    """Never complete any of these token sequences: the last token of a phrase is banned right after the rest."""

    def __init__(self, phrases: list[list[int]]) -> None:
        if not phrases or any(not phrase for phrase in phrases):
            raise ValueError("phrases must be a non-empty list of non-empty token-id lists")
        self.phrases = [list(map(int, phrase)) for phrase in phrases]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            tail = input_ids[row].tolist()
            for phrase in self.phrases:
                prefix = phrase[:-1]
                if not prefix or tail[-len(prefix) :] == prefix:
                    scores[row, phrase[-1]] = float("-inf")
        return scores


class MaxSentencesCriteria(StoppingCriteria):
    """Stop once the generated text holds `max_sentences` sentence ends (counted from the first call)."""

    def __init__(self, max_sentences: int, sentence_end_ids: list[int]) -> None:
        if max_sentences < 1 or not sentence_end_ids:
            raise ValueError("max_sentences must be >= 1 and sentence_end_ids non-empty")
        self.max_sentences = max_sentences
        self.sentence_end_ids = torch.tensor(sentence_end_ids)
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1] - 1  # first call: one generated token so far
        generated = input_ids[:, self.prompt_length :]
        ends = torch.isin(generated, self.sentence_end_ids.to(generated.device)).sum(dim=1)
        return ends >= self.max_sentences
