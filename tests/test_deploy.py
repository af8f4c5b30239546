"""The container and Kubernetes manifests: linted, validated against the Kubernetes schemas, and consistent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

DEPLOY = Path(__file__).parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent


def _load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text())


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([BIN / "hadolint", DEPLOY / "Dockerfile"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifests_pass_yamllint() -> None:
    config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"
    result = subprocess.run(
        [BIN / "yamllint", "--strict", "-d", config, DEPLOY / "k8s"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_manifests_validate_against_kubernetes_schemas() -> None:
    core = [p for p in MANIFESTS if p.name not in ("kustomization.yaml", "servicemonitor.yaml")]
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", *core], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") + result.stderr.count("passed") == len(core)


def test_manifests_agree_with_each_other_and_the_server() -> None:
    from service.cli import build_parser

    kustomization = _load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS if p.name != "kustomization.yaml")
    deployment, service, monitor, hpa = (_load(f"{n}.yaml") for n in ("deployment", "service", "servicemonitor", "hpa"))
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    flags = {action.dest for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    assert {name.removeprefix("GENSERVE_").lower() for name in env} <= flags, "every env var must be a serve flag"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["GENSERVE_DRAIN_SECONDS"])
    grpc_port = int(env["GENSERVE_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (Path(__file__).parent.parent / "service" / "metrics.py").read_text()
