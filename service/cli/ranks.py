"""`genserve serve --tensor-parallel-size N`: the serve process is rank 0, the leader, with every front end; it
starts ranks 1..N-1 as processes of the same command, which load their shards and follow its engine.

A follower never outlives its leader: it leaves with the leader's stop step, when a collective fails because the
leader is gone, or when it sees its parent change. It ignores SIGTERM and SIGINT, which the leader's drain
handles for the whole group. The leader ends the followers it started on its way out, whatever the way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PARENT_CHECK_SECONDS = 0.5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RankGroup:
    """The leader's followers (ranks 1..size-1) and the port their process group meets on."""

    size: int
    port: int
    followers: list[subprocess.Popen] = field(default_factory=list)

    @classmethod
    def start(cls, size: int, argv: list[str]) -> RankGroup:
        """Start ranks 1..size-1 running `genserve <argv>` as followers."""
        group = cls(size, free_port())
        for rank in range(1, size):
            command = [sys.executable, "-m", "genserve", *argv, "--tp-rank", str(rank), "--tp-port", str(group.port)]
            group.followers.append(subprocess.Popen(command))
        log.info("started %d tensor-parallel follower ranks: pids %s", size - 1, [p.pid for p in group.followers])
        return group

    def end(self, wait_seconds: float) -> None:
        """Wait up to `wait_seconds` for the followers to leave (after the leader's stop step), then kill the rest."""
        deadline = time.monotonic() + wait_seconds
        for process in self.followers:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def become_follower(args: argparse.Namespace) -> None:
    """This process is a follower rank: its leader's drain stops it, and it exits when the leader is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    parent = os.getppid()

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        log.error("tensor-parallel rank %d: the leader (pid %d) is gone; exiting", args.tp_rank, parent)
        os._exit(1)

    threading.Thread(target=watch_parent, name="genserve-parent-watch", daemon=True).start()
