"""The LoRA adapters the server knows, and those it holds in host memory.

Known adapters are those of `--lora-modules`, those loaded at run time (the admin RPC), and any folder under
`--lora-dir`, named by a request (as TGIS's adapter cache: read on first use). Reading one happens on the caller's
worker thread (`acquire`), never on the engine loop; concurrent requests for one adapter wait for the same read.
A request holds its adapter from submission to its end, so the engine always finds it in memory; at most
`max_cpu_loras` adapters stay in memory, and the least recently used one that no request holds is let go
(it is read again when named again).

The engine reads the adapters in memory as a mapping (name -> LoraAdapter), as the runner and the submission
check do.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from genserve.scheduler.core.errors import AdapterError, UnknownAdapterError
from genserve.scheduler.model.lora_adapters import LoraAdapter

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class AdapterRegistry(Mapping[str, LoraAdapter]):
    def __init__(
        self,
        read: Callable[[str, Path], LoraAdapter],
        modules: dict[str, Path],
        lora_dir: Path | None,
        max_cpu_loras: int,
    ) -> None:
        """`read(name, folder)`: the adapter in `folder`, checked against the served model (AdapterError if not)."""
        self._read = read
        self._paths = dict(modules)  # registered names (start-up and run time) -> folder
        self.lora_dir = lora_dir.resolve() if lora_dir is not None else None
        self.max_cpu_loras = max_cpu_loras
        self._loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self._holds: dict[str, int] = {}
        self._reading: dict[str, threading.Event] = {}
        self._unloaded: list[str] = []  # names the engine must drop from its adapter slots
        self._lock = threading.Lock()

    # The mapping the engine reads: adapters in memory.
    def __getitem__(self, name: str) -> LoraAdapter:
        with self._lock:
            return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._loaded))

    def __len__(self) -> int:
        with self._lock:
            return len(self._loaded)

    @property
    def serves_any(self) -> bool:
        return bool(self._paths) or self.lora_dir is not None

    def knows(self, name: str) -> bool:
        with self._lock:
            if name in self._paths or name in self._loaded:
                return True
        try:
            self._path_of(name)
        except (UnknownAdapterError, AdapterError):
            return False
        return True

    def known(self) -> list[str]:
        """Registered adapters, and those read from --lora-dir so far."""
        with self._lock:
            return sorted(set(self._paths) | set(self._loaded))

    def load(self, name: str) -> LoraAdapter:
        """Read `name` now (start-up); AdapterError says why it cannot be served."""
        self.acquire(name)
        self.release(name)
        return self[name]

    def acquire(self, name: str) -> None:
        """Hold adapter `name` in memory for a request, reading it first if needed (blocking: call it from a worker
        thread). UnknownAdapterError if no adapter has that name; AdapterError if it cannot be served."""
        while True:
            with self._lock:
                if name in self._loaded:
                    self._loaded.move_to_end(name)
                    self._holds[name] = self._holds.get(name, 0) + 1
                    return
                reading = self._reading.get(name)
                if reading is None:
                    path = self._path_of(name)
                    reading = self._reading[name] = threading.Event()
                    break
            reading.wait()  # another request is reading it: then take it from memory (or read it again on failure)
        try:
            adapter = self._read(name, path)
        finally:
            with self._lock:
                del self._reading[name]
            reading.set()
        with self._lock:
            self._loaded[name] = adapter
            self._holds[name] = self._holds.get(name, 0) + 1
            self._evict_over_limit()

    def release(self, name: str) -> None:
        """A request holding `name` has ended."""
        with self._lock:
            self._holds[name] -= 1
            if not self._holds[name]:
                del self._holds[name]

    def register(self, name: str, path: Path) -> LoraAdapter:
        """Load an adapter at run time (the admin RPC) under `name`; reading it checks it."""
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r}: use letters, digits, '_', '.' and '-'")
        with self._lock:
            if name in self._paths or name in self._loaded:
                raise AdapterError(f"adapter {name!r} is loaded already; unload it first")
        self._check_under_lora_dir(name, path)
        adapter = self._read(name, path)
        with self._lock:
            self._paths[name] = path
            self._loaded[name] = adapter
            self._evict_over_limit()
        return adapter

    def unregister(self, name: str) -> None:
        """Unload `name` (the admin RPC): refused while requests hold it."""
        with self._lock:
            if name not in self._paths and name not in self._loaded:
                raise UnknownAdapterError(name)
            if self._holds.get(name):
                raise AdapterError(f"adapter {name!r} has {self._holds[name]} requests in flight; unload it later")
            self._paths.pop(name, None)
            self._loaded.pop(name, None)
            self._unloaded.append(name)

    def take_unloaded(self) -> list[str]:
        """Adapters unloaded since the last call (the engine drops them from its slots)."""
        with self._lock:
            names, self._unloaded = self._unloaded, []
            return names

    def _path_of(self, name: str) -> Path:
        if name in self._paths:
            return self._paths[name]
        if self.lora_dir is None or not ADAPTER_NAME.fullmatch(name):
            raise UnknownAdapterError(name)
        path = self.lora_dir / name
        if not path.is_dir():
            raise UnknownAdapterError(name)
        self._check_under_lora_dir(name, path)
        return path

    def _check_under_lora_dir(self, name: str, path: Path) -> None:
        """With --lora-dir, adapters come only from folders under it (links that lead out of it included)."""
        if self.lora_dir is not None and not path.resolve().is_relative_to(self.lora_dir):
            raise AdapterError(f"adapter {name!r}: {path} is outside the server's --lora-dir")

    def _evict_over_limit(self) -> None:
        """Let go of the least recently used adapters no request holds, down to max_cpu_loras (under the lock)."""
        for name in list(self._loaded):
            if len(self._loaded) <= self.max_cpu_loras:
                return
            if not self._holds.get(name):
                del self._loaded[name]  # an adapter slot may keep its weights: the name still means that folder
