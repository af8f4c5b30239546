"""Regenerate the Python gRPC code from proto/ (`make proto`). A test fails when the committed code is stale."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["genserve/v1/generate.proto", "inference/grpc_service.proto", "fmaas/generation.proto"]
# Generated modules live in service/proto_gen/; the virtual include path makes their imports package-absolute.
PACKAGE_PREFIX = "service/proto_gen"


def generate(output_root: Path) -> list[Path]:
    """Write the generated modules under output_root/service/proto_gen/ and return their paths."""
    include = Path(protoc.__file__).parent / "_proto"
    for proto in PROTO_FILES:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PACKAGE_PREFIX}={PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={output_root}",
                f"--pyi_out={output_root}",
                f"--grpc_python_out={output_root}",
                f"{PACKAGE_PREFIX}/{proto}",
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    base = output_root / PACKAGE_PREFIX
    for folder in [base, *(p for p in base.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    generated = sorted(base.rglob("*.py*"))
    return generated


def generated_files(output_root: Path) -> dict[str, bytes]:
    base = output_root / PACKAGE_PREFIX
    return {
        str(p.relative_to(base)): p.read_bytes()
        for p in sorted(base.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".pyi")
    }


def is_stale() -> bool:
    with tempfile.TemporaryDirectory() as scratch:
        generate(Path(scratch))
        return generated_files(Path(scratch)) != generated_files(ROOT)


if __name__ == "__main__":
    generate(ROOT)
    print(f"generated {PACKAGE_PREFIX} from {PROTO_ROOT.relative_to(ROOT)}", file=sys.stderr)
