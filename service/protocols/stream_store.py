"""Resumable streams: a resumable request's output is kept, and its generation runs on, independently of the
client's connection, so a client that lost its stream can call again with `resume_from_token` and get the rest
without recomputation.

A stream is kept for `retention_seconds` after it finishes, or after its last reader went away while it was
still running; a running stream that nobody comes back for within that window is cancelled, freeing its row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from genserve.scheduler import GenerationOutput


class StreamNotFoundError(LookupError):
    """No retained stream under that request id (never resumable, or expired); maps to NOT_FOUND."""


@dataclass(frozen=True)
class Chunk:
    output: GenerationOutput
    token_offset: int  # index of this chunk's first token in the whole generation
    text_offset: int  # index of this chunk's first character in the whole text

    @classmethod
    def after(cls, previous: Chunk | None, output: GenerationOutput) -> Chunk:
        if previous is None:
            return cls(output, 0, 0)
        return cls(
            output,
            previous.token_offset + len(previous.output.token_ids),
            previous.text_offset + len(previous.output.text),
        )

    def without_tokens_before(self, token: int) -> Chunk | None:
        """This chunk as a reader resuming at `token` needs it: whole, emptied (a final chunk still carries the
        finish reason), or not at all."""
        if self.token_offset >= token:
            return self
        if self.output.finish_reason is None:
            return None
        return replace(self, output=replace(self.output, token_ids=(), text="", logprobs=()))


@dataclass
class RetainedStream:
    request_id: str
    chunks: list[Chunk] = field(default_factory=list)
    finished: bool = False
    error: BaseException | None = None
    readers: int = 0
    expires_at: float | None = None
    task: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _append(self, output: GenerationOutput) -> None:
        self.chunks.append(Chunk.after(self.chunks[-1] if self.chunks else None, output))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class StreamStore:
    def __init__(self, retention_seconds: float) -> None:
        self.retention_seconds = retention_seconds
        self._streams: dict[str, RetainedStream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def start(self, request_id: str, outputs: AsyncIterator[GenerationOutput]) -> RetainedStream:
        """Run `outputs` to the end in a task of its own, keeping every chunk."""
        self._sweep()
        stream = RetainedStream(request_id)
        self._streams[request_id] = stream
        stream.task = asyncio.get_running_loop().create_task(self._pump(stream, outputs))
        return stream

    def get(self, request_id: str) -> RetainedStream:
        self._sweep()
        stream = self._streams.get(request_id)
        if stream is None:
            raise StreamNotFoundError(f"no resumable stream {request_id!r} (unknown, or its retention expired)")
        return stream

    def is_retained(self, request_id: str) -> bool:
        self._sweep()
        return request_id in self._streams

    async def follow(self, stream: RetainedStream, from_token: int = 0) -> AsyncIterator[Chunk]:
        """The chunks from token `from_token` on, the kept ones first, then live ones as they come."""
        stream.readers += 1
        stream.expires_at = None
        index = 0
        try:
            while True:
                while index < len(stream.chunks):
                    chunk = stream.chunks[index].without_tokens_before(from_token)
                    index += 1
                    if chunk is not None:
                        yield chunk
                if stream.error is not None:
                    raise stream.error
                if stream.finished:
                    return
                await stream._changed.wait()
        finally:
            stream.readers -= 1
            if not stream.readers:
                stream.expires_at = time.monotonic() + self.retention_seconds
                asyncio.get_running_loop().call_later(self.retention_seconds + 0.01, self._sweep)

    async def _pump(self, stream: RetainedStream, outputs: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in outputs:
                stream._append(output)
        except asyncio.CancelledError:
            stream.error = StreamNotFoundError(f"stream {stream.request_id!r} expired before it finished")
        except Exception as error:  # noqa: BLE001 - handed to the readers, who turn it into a status
            stream.error = error
        finally:
            stream.finished = True
            if not stream.readers:
                stream.expires_at = time.monotonic() + self.retention_seconds
            stream._notify()

    def _sweep(self) -> None:
        now = time.monotonic()
        for request_id, stream in list(self._streams.items()):
            if stream.readers or stream.expires_at is None or stream.expires_at > now:
                continue
            if not stream.finished and stream.task is not None:
                stream.task.cancel()  # nobody came back: free the row
            del self._streams[request_id]
