"""`genserve serve`: load the model, warm it up and serve it over gRPC until SIGTERM drains it."""

from __future__ import annotations

import argparse

from genserve.service.cli.flags import (
    add_engine_arguments,
    add_feature_arguments,
    add_lora_arguments,
    add_model_arguments,
    add_parallel_arguments,
    build_engine,
    engine_config,
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
    plugins = PluginRegistry(
        logits_processors=parse_registrations(args.logits_processor),
        stopping_criteria=parse_registrations(args.stopping_criteria),
    )
    if args.tp_rank:
        return _follow(args, plugins)
    if args.tensor_parallel_size == 1:
        server = GenerationServer(build_engine(args, load(args), plugins), options)
        asyncio.run(server.serve_until_signal())
        return server.exit_code
    return _lead(args, plugins, options)


def _lead(args: argparse.Namespace, plugins: object, options: object) -> int:
    """Rank 0 of a tensor-parallel group: start the followers, load this shard, serve; end the group on the way
    out. A follower lost before the engine runs ends start-up; after, it ends the engine (`Engine.fail`)."""
    import asyncio
    import logging
    import os

    from genserve.scheduler import Lockstep, RankWatch, join_ranks, model_folder, resolve_device
    from genserve.service.cli.ranks import RankGroup
    from genserve.service.server import GenerationServer

    try:  # what the sharded step does not serve is refused before any rank starts
        engine_config(args)
    except ValueError as error:
        raise SystemExit(f"genserve: {error}") from None
    if args.load_format != "dummy":
        model_folder(args.model)  # converts a GGUF once, before the followers look for its folder

    def lost_during_start_up(reason: str) -> None:
        logging.getLogger(__name__).error("start-up failed: %s", reason)
        group.end(wait_seconds=0)
        os._exit(1)

    group = RankGroup.start(args.tensor_parallel_size, args.argv)
    watch = RankWatch(group.followers, args.step_timeout, lambda: None, lost_during_start_up).start()
    exit_code = 1
    try:
        join_ranks(0, group.size, group.port, resolve_device(args.device))
        engine = build_engine(args, load(args), plugins, Lockstep(0, group.size))
        watch.stop()
        RankWatch(group.followers, args.step_timeout, lambda: engine.busy_since, engine.fail).start()
        server = GenerationServer(engine, options)
        asyncio.run(server.serve_until_signal())
        exit_code = server.exit_code
    finally:
        watch.stop()
        group.end(wait_seconds=10 if exit_code == 0 else 0)
    if exit_code:
        logging.shutdown()
        os._exit(exit_code)  # the engine thread may be stuck in a collective with a lost rank: do not join it
    return 0


def _follow(args: argparse.Namespace, plugins: object) -> int:
    """Rank `--tp-rank` of a tensor-parallel group: load this shard and run the leader's steps until it stops."""
    import logging

    from genserve.scheduler import Lockstep, join_ranks, resolve_device
    from genserve.service.cli.ranks import become_follower

    become_follower(args)
    join_ranks(args.tp_rank, args.tensor_parallel_size, args.tp_port, resolve_device(args.device))
    engine = build_engine(args, load(args), plugins, Lockstep(args.tp_rank, args.tensor_parallel_size))
    engine.follow()
    logging.getLogger(__name__).info("rank %d of %d left with its leader", args.tp_rank, args.tensor_parallel_size)
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
    add_parallel_arguments(serve)
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
