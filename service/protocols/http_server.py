"""uvicorn, embedded: the HTTP app served on the running asyncio loop (the gRPC server's), started and stopped by
the server's own start-up and drain, never by signals of its own."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from genserve.service.ops.security import TLSConfig


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """The process's signals are the gRPC server's: SIGTERM drains both front ends in order."""
        yield


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, tls: TLSConfig | None) -> None:
        options: dict[str, object] = {}
        if tls is not None:
            options = dict(ssl_certfile=str(tls.cert_file), ssl_keyfile=str(tls.key_file))
            if tls.client_ca_file is not None:
                options.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_level="warning", access_log=False, **options
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Serve in a task of this loop; returns the bound port once it listens."""
        self._task = asyncio.ensure_future(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (a port in use)
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)
        return self._server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
