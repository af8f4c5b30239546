"""The heap that start-up freed, handed back to the system before the server turns SERVING."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_free_heap() -> None:
    """Loading, packing and (with --compile) tracing the model allocate and free far more than serving holds, and
    glibc keeps freed heap memory for reuse: the server's resident memory would carry what start-up let go. A
    garbage collection, then glibc's `malloc_trim`, returns it (nothing happens under another C library)."""
    gc.collect()
    library = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(library), "malloc_trim", None) if library else None
    if trim is not None:
        trim(0)
