"""Keep torch's CPU parallelism to one thread of the process: the engine thread.

Torch's CPU kernels run on OpenMP (libgomp), which keeps a pool of worker threads for every thread that ever
ran a parallel region. Once a process holds more of those threads than there are cores, libgomp stops spinning
between parallel regions, and every kernel then pays a sleep and a wake-up. Loading the model on the main thread
(or running a baseline there) and then stepping the engine on its own thread is exactly that case: measured on
this project's 2-core machine, the same engine steps ran 30-50% slower on the engine thread than on the main
thread (`genserve bench --through-grpc`: 45 against 59 tokens/s). Model work that must happen before the engine
thread starts therefore runs in a passing thread, whose worker pool ends with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def in_passing_thread(work: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`work(*args, **kwargs)` on a thread of its own, which ends (with its OpenMP pool) before this returns."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="genserve-model-work")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
