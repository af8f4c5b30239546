"""`genserve serve`: load the model, warm it up and serve it over gRPC until SIGTERM drains it."""

from __future__ import annotations

import argparse

from genserve.service.cli.flags import (
    add_engine_arguments,
    add_feature_arguments,
    add_lora_arguments,
    add_model_arguments,
    build_engine,
    env_default,
    load,
)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from genserve.scheduler import PluginRegistry, parse_registrations
    from genserve.service.ops.security import TLSConfig, read_tokens
    from genserve.service.server import GenerationServer, ServerOptions

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise SystemExit("--tls-cert and --tls-key go together")
        tls = TLSConfig(
            Path(args.tls_cert), Path(args.tls_key), Path(args.tls_client_ca) if args.tls_client_ca else None
        )
    elif args.tls_client_ca:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        grace_seconds=args.drain_seconds,
        metrics_port=args.metrics_port,
        tls=tls,
        auth_tokens=read_tokens(Path(args.auth_token_file)) if args.auth_token_file else None,
        max_message_bytes=args.max_message_bytes,
        max_requests_per_client=args.max_requests_per_client or None,
        stream_retention_seconds=args.stream_retention_seconds,
        http_port=args.http_port or None,
    )
    loaded = load(args)
    plugins = PluginRegistry(
        logits_processors=parse_registrations(args.logits_processor),
        stopping_criteria=parse_registrations(args.stopping_criteria),
    )
    server = GenerationServer(build_engine(args, loaded, plugins), options)
    asyncio.run(server.serve_until_signal())
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model over gRPC and the OpenAI-compatible HTTP API",
        description="Loads the model, warms it up, then serves genserve.v1.TextGeneration, KServe v2, TGIS, "
        "grpc.health.v1 and server reflection over gRPC, and the OpenAI-compatible API over HTTP. SIGTERM drains: "
        "health turns NOT_SERVING, new requests are refused and running ones "
        "finish within --drain-seconds. Every flag also reads GENSERVE_<FLAG> from the environment.",
    )
    add_model_arguments(serve)
    add_engine_arguments(serve)
    add_feature_arguments(serve)
    add_lora_arguments(serve)
    serve.add_argument(
        "--host", default=env_default("host", "127.0.0.1"), help="address to bind (0.0.0.0 in a container)"
    )
    serve.add_argument("--port", type=int, default=int(env_default("port", "50051")))
    serve.add_argument(
        "--http-port",
        type=int,
        default=int(env_default("http_port", "8000")),
        help="the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
        "/detokenize, /health, /metrics), same engine, tokens and TLS as gRPC; 0 turns it off",
    )
    serve.add_argument(
        "--metrics-port", type=int, default=int(env_default("metrics_port", "9464")), help="Prometheus /metrics port"
    )
    serve.add_argument(
        "--stream-retention-seconds",
        type=float,
        default=float(env_default("stream_retention_seconds", "60")),
        help="how long a resumable stream's output is kept for its client to resume it",
    )
    serve.add_argument(
        "--drain-seconds", type=float, default=float(env_default("drain_seconds", "30")), help="grace period on SIGTERM"
    )
    custom = serve.add_argument_group("custom components (requests enable them by name, with JSON arguments)")
    custom.add_argument(
        "--logits-processor",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="register an HF-compatible LogitsProcessor class (repeatable)",
    )
    custom.add_argument(
        "--stopping-criteria",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="register an HF-compatible StoppingCriteria class (repeatable)",
    )
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", default=env_default("tls_cert", ""), help="PEM certificate chain: serve TLS")
    security.add_argument("--tls-key", default=env_default("tls_key", ""), help="PEM private key for --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        default=env_default("tls_client_ca", ""),
        help="PEM CA: require client certificates (mutual TLS)",
    )
    security.add_argument(
        "--auth-token-file",
        default=env_default("auth_token_file", ""),
        help="accepted bearer tokens, one per line; calls without one get UNAUTHENTICATED (health stays open)",
    )
    security.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(env_default("max_message_bytes", str(4 * 1024 * 1024))),
        help="largest request or response message",
    )
    serve.add_argument(
        "--log-format",
        default=env_default("log_format", "json"),
        choices=["json", "text"],
        help="log lines as JSON or text",
    )
    serve.set_defaults(handler=cmd_serve)
