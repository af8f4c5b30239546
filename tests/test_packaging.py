"""genserve installs under one name: the wheel holds only `genserve`, its command works from a fresh environment,
and no module is ever imported under a bare `scheduler.` or `service.` name (a module loaded twice would make
two copies of its classes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package_folder() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"genserve"} | {
        "genserve." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("scheduler", "service")
        for init in (ROOT / top).glob("**/__init__.py")
    }
    assert set(setuptools["packages"]) == folders


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    # A copy of what the wheel is built from, so that setuptools' build/ folder stays out of the checkout.
    for name in ("pyproject.toml", "README.md", "genserve", "scheduler", "service"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return next(out.glob("genserve-*.whl"))


def test_the_wheel_holds_only_genserve(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"genserve", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "genserve/scheduler/model/model_configs/smollm2-135m/config.json" in names
    assert "genserve/service/proto_gen/genserve/v1/generate_pb2.py" in names
    assert not any("proto_build" in name or name.startswith("genserve/tests") for name in names)


def test_a_fresh_environment_runs_the_command_and_knows_no_bare_names(wheel: Path, tmp_path: Path) -> None:
    """The wheel installed by pip without its dependencies, which come from this environment's site-packages
    through a .pth line (a folder named there is only added to sys.path: its own editable-install hooks do not
    run, so this genserve cannot be found through the checkout)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(
        subprocess.run(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 300}
    for command in ([venv / "bin" / "genserve", "serve", "--help"], [python, "-m", "genserve", "--help"]):
        result = subprocess.run(command, **outside)
        assert result.returncode == 0 and "usage: genserve" in result.stdout, result.stderr[-2000:]
    serve_help = subprocess.run([venv / "bin" / "genserve", "serve", "--help"], **outside).stdout
    assert "--max-batch-size" in serve_help and "--kv-cache-memory" in serve_help
    for bare in ("scheduler", "service"):
        result = subprocess.run([python, "-c", f"import {bare}"], **outside)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr
    where = subprocess.run([python, "-c", "import genserve.scheduler.engine.loop as m; print(m.__file__)"], **outside)
    assert where.stdout.startswith(str(site)), where.stderr[-2000:]


def test_no_module_is_imported_under_a_bare_name() -> None:
    """Every module of genserve and of the tests, imported in one process from the repository root."""
    probe = """
import importlib, pkgutil, sys
from pathlib import Path
import genserve
for root in ("genserve.scheduler", "genserve.service"):
    package = importlib.import_module(root)
    for module in pkgutil.walk_packages(package.__path__, root + "."):
        importlib.import_module(module.name)
for path in sorted(Path("tests").glob("*.py")):
    if path.stem not in ("gpu_check",):
        importlib.import_module("tests." + path.stem)
importlib.import_module("tests.gpu_check")
bare = sorted(name for name in sys.modules if name.split(".")[0] in ("scheduler", "service"))
print(len(sys.modules), bare)
assert not bare, bare
"""
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
