"""The `genserve` command: serve the model over gRPC, benchmark the engine, or talk to a running server."""

from __future__ import annotations

import argparse
import os
import sys

from genserve.service.cli import bench, client, loadtest, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Text generation with continuous batching and the exact semantics of transformers' generate().",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    bench.add_parser(commands)
    serve.add_parser(commands)
    client.add_parsers(commands)
    loadtest.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a tensor-parallel leader starts its ranks with
    from genserve.service.ops.logs import configure_logging

    configure_logging(os.environ.get("GENSERVE_LOG_LEVEL", "INFO"), getattr(args, "log_format", "text"))
    try:
        return args.handler(args)
    except ValueError as error:
        from genserve.scheduler import AdapterError, UnsupportedModelError

        if not isinstance(error, UnsupportedModelError | AdapterError):
            raise
        # At start-up, before any request: say what and why, and exit non-zero.
        what = "this model" if isinstance(error, UnsupportedModelError) else "this adapter"
        print(f"genserve: cannot serve {what}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
