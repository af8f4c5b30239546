"""Constrained decoding (the service form of `prefix_allowed_tokens_fn`): regex, JSON schema, choice and grammar
constraints compiled by llguidance, applied to the batch as per-row token bitmasks.

Compiling happens off the engine loop (the async front end calls `GrammarCompiler.matcher` in a worker thread)
and is cached: a request gets a copy of the compiled matcher. On the engine loop, each step fills the bitmasks of
the constrained rows (llguidance works in parallel, without the GIL), masks the logits on the device, and after
the step's one host copy advances each row's matcher by its chosen token.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import PreTrainedTokenizerBase

from genserve.scheduler.core.params import ValidationError
from genserve.scheduler.core.request import Constraint

CONSTRAINT_KINDS = ("regex", "json_schema", "choice", "grammar")


class GrammarCompiler:
    """Compiles constraints for one tokenizer; keeps the last `cache_size` compiled grammars."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, cache_size: int = 256) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._cache_size = cache_size
        self._cache: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None

    def matcher(self, constraint: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for one request (slow on a cache miss: call it off the event loop)."""
        if constraint.kind not in CONSTRAINT_KINDS:
            raise ValidationError("constraint", f"unknown kind {constraint.kind!r}")
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
                return compiled.deep_copy()
        compiled = self._compile(constraint)
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled.deep_copy()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._hf_tokenizer is None:
            raise ValidationError("constraint", "this model has no tokenizer; only allowed_token_ids can constrain it")
        with self._lock:
            if self._tokenizer is None:  # building it reads the whole vocabulary (~1 s): once per server
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size)
            return self._tokenizer

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        tokenizer = self._llg_tokenizer()
        try:
            if constraint.kind == "json_schema":
                # Compact JSON unless the schema's "x-guidance" says otherwise: free whitespace lets a model
                # spend its tokens on blanks.
                schema = json.loads(constraint.spec)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
            else:
                grammar = llguidance.grammar_from(constraint.kind, constraint.spec)
        except ValueError as error:
            raise ValidationError(constraint.kind, str(error)) from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)  # never raises: an invalid grammar
        # leaves the matcher in an error state that says why
        if matcher.is_error():
            raise ValidationError(constraint.kind, matcher.get_error())
        return matcher


class TokenBitmasks:
    """The per-row allowed-token bitmasks of one batch: filled on the host, expanded and applied on the device."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.host = llguidance.torch.allocate_token_bitmask(max_rows, vocab_size)
        self.bit_positions = torch.arange(32, dtype=torch.int32, device=device)
        self.executor = llguidance.LLExecutor()

    def apply(self, scores: torch.Tensor, rows: list[int], matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """Set the logits of every token the row's matcher forbids to -inf."""
        llguidance.torch.fill_next_token_bitmask_par(self.executor, list(zip(matchers, range(len(rows)))), self.host)
        words = self.host[: len(rows)].to(self.device, non_blocking=True)
        allowed = ((words.unsqueeze(-1) >> self.bit_positions) & 1).flatten(1)[:, : scores.shape[1]].bool()
        index = torch.tensor(rows, device=self.device)
        return scores.index_put((index,), scores[index].masked_fill(~allowed, float("-inf")))


def advance(matcher: llguidance.LLMatcher, token_id: int) -> bool:
    """Feed the chosen token; True when the constraint is complete (only the end of the output may follow)."""
    if not matcher.consume_token(token_id):
        raise RuntimeError(f"the constraint rejected token {token_id}: {matcher.get_error()}")
    return matcher.is_stopped()
