"""deploy/kubernetes: schema-valid, internally consistent, and concur's config parses.

Core kinds are validated against the Kubernetes JSON schemas shipped offline by
``kubernetes-validate`` (strict: unknown fields fail). Custom resources (the Prometheus
operator's PodMonitor) and the kustomization are not in those schemas: they get a
structural schema of their own here, plus cross-reference checks.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from deploy_support import DOCKERFILE, KUBERNETES, load_yaml, load_yaml_docs

from concur.config import load_settings

# The oldest release we support (native sidecars, sleep hooks not used) and the newest
# the installed kubernetes-validate ships.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
CORE_KINDS = {"ConfigMap", "Deployment", "Service"}
CRD_KINDS = {"PodMonitor"}

Obj = dict[str, Any]


def deployment(objects: dict[str, Obj]) -> Obj:
    return objects["Deployment/vllm-concur"]


def containers(objects: dict[str, Obj]) -> dict[str, Obj]:
    pod = deployment(objects)["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def port_names(objects: dict[str, Obj]) -> dict[str, int]:
    names: dict[str, int] = {}
    for c in containers(objects).values():
        for port in c.get("ports", []):
            assert port["name"] not in names, f"port name {port['name']} used twice in the pod"
            names[port["name"]] = port["containerPort"]
    return names


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------------------- schemas


def test_only_known_kinds(k8s_objects: dict[str, Obj]) -> None:
    kinds = {o["kind"] for o in k8s_objects.values()}
    assert kinds == CORE_KINDS | CRD_KINDS


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_validate_against_kubernetes_schemas(
    k8s_objects: dict[str, Obj], version: str
) -> None:
    checked = []
    for key, obj in k8s_objects.items():
        if obj["kind"] in CRD_KINDS:
            continue  # not in the core schemas: see test_podmonitor_structure
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{key} is invalid for Kubernetes {version}: {path}: {exc.message}")
        checked.append(key)
    assert sorted(checked) == [
        "ConfigMap/concur-config",
        "Deployment/vllm-concur",
        "Service/vllm-concur",
    ]


def test_kubernetes_validation_catches_mistakes(k8s_objects: dict[str, Obj]) -> None:
    """The strict schema rejects a misspelled field: the test above can fail."""
    broken = copy.deepcopy(deployment(k8s_objects))
    broken["spec"]["template"]["spec"]["containers"][1]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


# The Prometheus operator's PodMonitor (monitoring.coreos.com/v1), reduced to the fields
# these manifests may use; unknown fields fail, as the CRD's structural schema would prune
# them silently (a typo there means no scraping, not an error).
_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array"},
    },
    "additionalProperties": False,
}
_DURATION = {
    "type": "string",
    # Prometheus durations, as the CRD's pattern: 30s, 1m30s, 5m, ...
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$",
}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def test_podmonitor_structure(k8s_objects: dict[str, Obj]) -> None:
    monitor = k8s_objects["PodMonitor/vllm-concur"]
    jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).validate(monitor)
    bad = {**monitor, "spec": {**monitor["spec"], "podMetricEndpoints": []}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(PODMONITOR_SCHEMA).validate(bad)


def test_podmonitor_scrapes_both_containers(k8s_objects: dict[str, Obj]) -> None:
    monitor = k8s_objects["PodMonitor/vllm-concur"]
    pod_labels = deployment(k8s_objects)["spec"]["template"]["metadata"]["labels"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], pod_labels)
    ports = port_names(k8s_objects)
    scraped = {ep["port"]: ep["path"] for ep in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"http": "/metrics", "vllm-http": "/metrics"}
    assert ports["http"] == 9000 and ports["vllm-http"] == 8000


# ------------------------------------------------------------------------ kustomization


def test_kustomization_lists_every_manifest_and_its_images() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    allowed = {
        "apiVersion",
        "kind",
        "labels",
        "resources",
        "images",
        "namespace",
        "commonAnnotations",
    }
    assert set(kustomization) <= allowed, set(kustomization) - allowed
    images = {}
    for doc in load_yaml_docs(KUBERNETES / "deployment.yaml"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            name, _, tag = c["image"].partition(":")
            images[name] = tag
    for entry in kustomization["images"]:
        assert entry["name"] in images, f"images: {entry['name']} is not a container image"
        if "newTag" in entry:
            assert entry["newTag"] == images[entry["name"]], "newTag and the manifest disagree"


# ----------------------------------------------------------------- pod and its wiring


def test_deployment_selector_service_and_probes(k8s_objects: dict[str, Obj]) -> None:
    dep = deployment(k8s_objects)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    service = k8s_objects["Service/vllm-concur"]
    assert matches(service["spec"]["selector"], labels)
    ports = port_names(k8s_objects)
    # Agents reach concur only: the Service exposes concur's port and nothing else.
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(9000, "http")]

    c = containers(k8s_objects)
    assert set(c) == {"vllm", "concur"}
    assert c["concur"]["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["concur"]["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c["vllm"][probe]["httpGet"] == {"path": "/health", "port": "vllm-http"}
    for container in c.values():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in container:
                assert container[probe]["httpGet"]["port"] in ports
        assert container["resources"]["requests"], f"{container['name']}: no requests"
    assert c["vllm"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_concur_container_runs_as_the_image_user(k8s_objects: dict[str, Obj]) -> None:
    concur = containers(k8s_objects)["concur"]
    sc = concur["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", DOCKERFILE.read_text(), re.M)
    assert users, "the Dockerfile has no numeric USER"
    uid, gid = users[-1]
    assert sc["runAsUser"] == int(uid) and sc["runAsGroup"] == int(gid or uid)
    assert concur["args"] == ["--listen", "0.0.0.0:9000"]


def _configmap_file(k8s_objects: dict[str, Obj], tmp_path: Path) -> tuple[Path, str]:
    """concur's config file as the pod sees it: (written copy, path in the container)."""
    concur = containers(k8s_objects)["concur"]
    env = {e["name"]: e.get("value") for e in concur["env"]}
    in_container = env["CONCUR_CONFIG"]
    pod = deployment(k8s_objects)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in concur["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume and in_container.startswith(mount["mountPath"].rstrip("/") + "/"):
            key = in_container[len(mount["mountPath"].rstrip("/")) + 1 :]
            cm = k8s_objects[f"ConfigMap/{volume['configMap']['name']}"]
            assert key in cm["data"], f"ConfigMap has no key {key} for CONCUR_CONFIG"
            path = tmp_path / key
            path.write_text(cm["data"][key])
            return path, in_container
    raise AssertionError(f"no ConfigMap volume is mounted where CONCUR_CONFIG={in_container}")


def test_configmap_config_parses_with_concurs_loader(
    k8s_objects: dict[str, Obj], tmp_path: Path
) -> None:
    path, in_container = _configmap_file(k8s_objects, tmp_path)
    assert in_container == "/etc/concur/concur.toml"
    settings = load_settings(path, env={})
    # concur talks to vLLM on localhost, at the port the vLLM container listens on.
    assert settings.upstream.url == f"http://127.0.0.1:{port_names(k8s_objects)['vllm-http']}"
    assert settings.engine.kind == "vllm"
    assert settings.policy.name == "aimd"
    assert settings.policy.aimd.high == 0.85 and settings.policy.aimd.low == 0.7
    assert settings.admission.identity[0] == "header:X-Concur-Agent-Id"


def test_vllm_outlives_concurs_drain(k8s_objects: dict[str, Obj], tmp_path: Path) -> None:
    """On shutdown concur drains in-flight requests while vLLM (preStop sleep) still serves."""
    path, _ = _configmap_file(k8s_objects, tmp_path)
    drain = load_settings(path, env={}).server.drain_timeout
    vllm = containers(k8s_objects)["vllm"]
    command = vllm["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", shlex.join(command)
    sleep = float(command[1])
    grace = deployment(k8s_objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain < sleep < grace, (drain, sleep, grace)


def test_vllm_serves_the_model_on_the_probed_port(k8s_objects: dict[str, Obj]) -> None:
    vllm = containers(k8s_objects)["vllm"]
    args = vllm["args"]
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    assert args[args.index("--model") + 1] == "$(MODEL)" and env["MODEL"] == "Qwen/Qwen3-8B"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == port_names(k8s_objects)["vllm-http"]
