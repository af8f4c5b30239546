"""Start-up's freed heap goes back to the system before the server turns SERVING (service/ops/heap.py)."""

from __future__ import annotations

from pathlib import Path

from genserve.service.benchmarks.serving_memory import resident_bytes
from genserve.service.ops.heap import release_free_heap


def _resident_mib() -> float:
    return resident_bytes(Path("/proc/self/status").read_text()) / 2**20


def test_freed_heap_between_live_blocks_is_returned() -> None:
    """Blocks freed between blocks that stay alive cannot shrink the heap from its top, so glibc keeps their pages
    resident until malloc_trim hands them back (what loading and compiling leave behind)."""
    blocks = [bytes(8192) for _ in range(20_000)]  # 160 MiB through malloc, every page touched
    kept = blocks[::50]
    del blocks
    before = _resident_mib()
    release_free_heap()
    assert before - _resident_mib() > 64
    assert len(kept) == 400
