"""The floors in pyproject.toml are true: an environment with exactly the minimum allowed version of every direct
dependency imports the server and serves exactly (tests/floors_smoke.py). The environment (.venv-floors) is kept
while the floors stay the same."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ROOT / ".venv-floors"


def floor_pins() -> list[str]:
    """`name==floor` for every direct dependency; a dependency without a floor fails here."""
    pins = []
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        floors = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
        assert floors, f"{requirement.name} has no floor"
        pins.append(f"{requirement.name}=={floors[0]}")
    return pins


def _build(pins: list[str]) -> Path:
    python, stamp = FLOORS / "bin" / "python", FLOORS / ".pins"
    # genserve itself goes in editable and without dependencies: the pins are the dependencies under test.
    recorded = "\n".join([*pins, "genserve: editable, no deps"])
    if stamp.exists() and stamp.read_text() == recorded:
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(FLOORS)], check=True)
    torch = [pin for pin in pins if pin.startswith("torch==")]
    install = [str(python), "-m", "pip", "install", "-q"]
    # torch first, alone: the CPU wheel on this machine's disk; nothing after it may pull another build.
    subprocess.run([*install, *torch], check=True, capture_output=True, timeout=900)
    rest = [pin for pin in pins if pin not in torch]
    result = subprocess.run([*install, *rest, *torch, "pytest"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"the floors do not install together:\n{result.stderr[-3000:]}"
    subprocess.run([*install, "--no-deps", "-e", str(ROOT)], check=True, capture_output=True, timeout=900)
    stamp.write_text(recorded)
    return python


def test_minimum_versions_import_the_server_and_serve_exactly() -> None:
    python = _build(floor_pins())
    installed = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    assert "protobuf==" + next(p for p in floor_pins() if p.startswith("protobuf")).split("==")[1] in installed
    result = subprocess.run(
        [str(python), str(ROOT / "tests" / "floors_smoke.py")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
