"""Transport security and authentication at the service edge: TLS / mutual TLS and bearer tokens.

Health checks stay open so that load balancers and Kubernetes probes work without credentials; everything
else needs `authorization: Bearer <token>` when a token file is configured.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: clients must present a certificate signed by this CA (mTLS)

    def server_credentials(self) -> grpc.ServerCredentials:
        root = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )


def read_tokens(path: Path) -> frozenset[str]:
    """One accepted token per line; blank lines and '#' comments ignored."""
    lines = (line.strip() for line in path.read_text().splitlines())
    tokens = frozenset(line for line in lines if line and not line.startswith("#"))
    if not tokens:
        raise ValueError(f"--auth-token-file {path} holds no token")
    return tokens


def bearer_token_accepted(header: str, tokens: frozenset[str]) -> bool:
    """Whether an `authorization` value is `Bearer <one of tokens>` (gRPC metadata and HTTP headers alike)."""
    scheme, _, token = header.partition(" ")
    # compare_digest for every token: timing must not reveal how much of a guess was right.
    matches = [hmac.compare_digest(token.encode(), known.encode()) for known in tokens]
    return scheme.lower() == "bearer" and any(matches)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED, before any handler runs."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tokens

    def _authorized(self, metadata: tuple[tuple[str, str], ...]) -> bool:
        return bearer_token_accepted(dict(metadata or ()).get("authorization", ""), self._tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return _refusing_handler(handler)


def _refusing_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request, context):  # noqa: ANN001, ANN202 - grpc's handler signature
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def refuse_stream(request, context):  # noqa: ANN001, ANN202
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
