"""Regenerate the Python gRPC code from proto/ (`make proto`). A test fails when the committed code is stale."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = ["genserve/v1/generate.proto", "inference/grpc_service.proto", "fmaas/generation.proto"]
# Generated modules live in service/proto_gen/ and install as genserve.service.proto_gen: the virtual include
# path makes their imports of each other absolute under that name.
PACKAGE_PREFIX = "genserve/service/proto_gen"
FOLDER = "service/proto_gen"  # where the package lives in the repository (pyproject.toml's package-dir)


def generate(output_root: Path) -> list[Path]:
    """Write the generated modules under output_root/service/proto_gen/ and return their paths."""
    with tempfile.TemporaryDirectory() as scratch:
        _protoc(Path(scratch))
        target = output_root / FOLDER
        for source in sorted((Path(scratch) / PACKAGE_PREFIX).rglob("*")):
            if source.is_file():
                destination = target / source.relative_to(Path(scratch) / PACKAGE_PREFIX)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(source.read_bytes())
    return sorted(target.rglob("*.py*"))


def _protoc(output_root: Path) -> None:
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


def generated_files(output_root: Path) -> dict[str, bytes]:
    base = output_root / FOLDER
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
    print(f"generated {FOLDER} ({PACKAGE_PREFIX}) from {PROTO_ROOT.relative_to(ROOT)}", file=sys.stderr)
