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
    # Envoy's "@type" URLs are single words longer than any line limit.
    line_length = "{max: 120, allow-non-breakable-inline-mappings: true}"
    config = f"{{extends: default, rules: {{line-length: {line_length}, document-start: disable}}}}"
    result = subprocess.run(
        [
            BIN / "yamllint",
            "--strict",
            "-d",
            config,
            *(DEPLOY / d for d in ("k8s", "k8s-tensor-parallel", "envoy", "gateway")),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_core_manifests_validate_against_kubernetes_schemas() -> None:
    core = [p for p in MANIFESTS if p.name not in ("kustomization.yaml", "servicemonitor.yaml")]
    core.append(DEPLOY / "envoy" / "proxy.yaml")
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", *core], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    documents = sum(len(list(yaml.safe_load_all(path.read_text()))) for path in core)
    assert result.stdout.count("passed") + result.stderr.count("passed") == documents


def test_manifests_agree_with_each_other_and_the_server() -> None:
    from genserve.service.cli.main import build_parser

    kustomization = _load("kustomization.yaml")
    local = sorted(p.name for p in MANIFESTS if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted([*local, "../envoy"])
    deployment, service, monitor, hpa = (_load(f"{n}.yaml") for n in ("deployment", "service", "servicemonitor", "hpa"))
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    flags = {action.dest for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    assert {name.removeprefix("GENSERVE_").lower() for name in env} <= flags, "every env var must be a serve flag"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + float(env["GENSERVE_DRAIN_SECONDS"])
    grpc_port = int(env["GENSERVE_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in (Path(__file__).parent.parent / "service" / "ops" / "metrics.py").read_text()


def test_scale_out_manifests_agree() -> None:
    """The HPA's metrics are served by the adapter rules and exported by the server; Envoy's cluster resolves the
    headless Service of the replicas; its ConfigMap is generated from the one Envoy config."""
    hpa, rules, replicas = _load("hpa.yaml"), _load("prometheus-adapter-rules.yaml"), _load("replicas-service.yaml")
    served = {rule["name"]["as"] for rule in yaml.safe_load(rules["data"]["config.yaml"])["rules"]}
    wanted = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"]}
    assert wanted == served == {"genserve_queue_size", "genserve_running_requests"}
    exported = (Path(__file__).parent.parent / "service" / "ops" / "metrics.py").read_text()
    assert all(name in exported for name in wanted)
    assert replicas["spec"]["clusterIP"] == "None"
    envoy = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    cluster = envoy["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint["address"].startswith(replicas["metadata"]["name"] + ".")
    assert endpoint["port_value"] == replicas["spec"]["ports"][0]["port"]
    generator = yaml.safe_load((DEPLOY / "envoy" / "kustomization.yaml").read_text())["configMapGenerator"][0]
    proxy = list(yaml.safe_load_all((DEPLOY / "envoy" / "proxy.yaml").read_text()))[0]
    assert generator["files"] == ["envoy.yaml"]
    assert proxy["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == generator["name"]


def test_inference_pool_routes_to_the_http_api_by_genserve_metrics(tmp_path: Path) -> None:
    """The Gateway API Inference Extension example: the pool selects the genserve pods on the HTTP API's port, the
    endpoint picker reads metric names the server exports, and its core objects validate."""
    documents = list(yaml.safe_load_all((DEPLOY / "gateway" / "inference-pool.yaml").read_text()))
    by_kind = {document["kind"]: document for document in documents}
    pool, picker = by_kind["InferencePool"], by_kind["Deployment"]
    deployment = _load("deployment.yaml")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    http_port = int({e["name"]: e["value"] for e in container["env"]}["GENSERVE_HTTP_PORT"])
    assert [port["number"] for port in pool["spec"]["targetPorts"]] == [http_port]
    assert (
        pool["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    arguments = picker["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(arguments[::2], arguments[1::2]))
    exported = (Path(__file__).parent.parent / "service" / "ops" / "metrics.py").read_text()
    for flag in (
        "--total-queued-requests-metric",
        "--total-running-requests-metric",
        "--kv-cache-usage-percentage-metric",
        "--lora-info-metric",
    ):
        assert f'"{flags[flag]}"' in exported, flag
    assert flags["--pool-name"] == pool["metadata"]["name"]
    assert pool["spec"]["endpointPickerRef"]["name"] == by_kind["Service"]["metadata"]["name"]
    core = tmp_path / "core.yaml"
    core.write_text(yaml.safe_dump_all([d for d in documents if d["apiVersion"] in ("v1", "apps/v1")]))
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", core], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tensor_parallel_overlay_patches_the_base_deployment() -> None:
    """The multi-GPU variant: the base Deployment's own container, a GPU per rank, real flags, shared memory."""
    from genserve.service.cli.main import build_parser

    folder = DEPLOY / "k8s-tensor-parallel"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../k8s"]
    patch = yaml.safe_load((folder / kustomization["patches"][0]["path"]).read_text())
    base = _load("deployment.yaml")
    assert patch["metadata"]["name"] == base["metadata"]["name"]
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    flags = {action.dest for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions}
    assert {name.removeprefix("GENSERVE_").lower() for name in env} <= flags
    ranks = int(env["GENSERVE_TENSOR_PARALLEL_SIZE"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == ranks
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in patch["spec"]["template"]["spec"]["volumes"]}
    shm = next(name for name, path in mounts.items() if path == "/dev/shm")
    assert volumes[shm]["emptyDir"]["medium"] == "Memory"
