"""The code stays formatted and lint-clean (ruff, configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
RUFF = Path(sys.executable).parent / "ruff"


def test_ruff_check_and_format() -> None:
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run([RUFF, *command, "."], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold() -> None:
    """The layers declared in pyproject.toml's [tool.importlinter]: the engine never imports a front end, the front
    ends use only genserve.scheduler's public names, the core imports no torch, no cycles, no benchmarks in serving."""
    result = subprocess.run(
        [Path(sys.executable).parent / "lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "0 broken" in result.stdout, result.stdout[-4000:] + result.stderr
