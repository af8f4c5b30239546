"""Incremental detokenization and stop-string matching, per request, outside the engine step.

Text comes from `tokenizers`' DecodeStream, which holds back a token until it completes a UTF-8 character, so
no delta ever ends in half a character. Text that could still turn into a stop string is held back too, so a
client never receives text that a later stop string swallows; the final text ends before the stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextDelta:
    text: str
    stop_string: str | None = None  # set when this token completed a stop string


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop_strings: tuple[str, ...] = (), skip_special_tokens: bool = True
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop_strings = stop_strings
        self._longest_stop = max((len(s) for s in stop_strings), default=0)
        self._text = ""
        self._emitted = 0

    @property
    def text(self) -> str:
        """Everything emitted so far (after a stop string hit: the final text)."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> TextDelta:
        piece = self._stream.step(self._backend, token_id)
        if piece:
            self._text += piece
        if self._stop_strings:
            hit = self._find_stop()
            if hit is not None:
                position, stop = hit
                self._text = self._text[:position]
                return TextDelta(self._take(position), stop)
            return TextDelta(self._take(len(self._text) - self._held_back()))
        return TextDelta(self._take(len(self._text)))

    def flush(self) -> str:
        """The held-back tail, once the request ended for another reason."""
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _find_stop(self) -> tuple[int, str] | None:
        # A new match must end in text not searched before, so only the last longest_stop-1 old chars matter.
        start = max(0, self._emitted - self._longest_stop + 1)
        hits = [(self._text.find(stop, start), stop) for stop in self._stop_strings]
        found = [(position, stop) for position, stop in hits if position >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the start of some stop string."""
        for length in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(stop.startswith(tail) for stop in self._stop_strings):
                return length
        return 0
