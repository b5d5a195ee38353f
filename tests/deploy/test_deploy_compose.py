"""deploy/compose: valid against the Compose Specification schema, and wired consistently.

The schema is the compose-spec JSON schema vendored by ``check-jsonschema`` (found with
importlib.resources, no network). Beyond the schema: bind-mounted files exist, the build
points at the Dockerfile, Prometheus scrapes hosts that exist on the compose network,
concur's config parses with concur's own loader and points at the engine service, and the
simulated engine's command line parses with ``concur engine``'s own parser.
"""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deploy_support import COMPOSE, DASHBOARD, DOCKERFILE, REPO, load_yaml

from concur.config import load_settings

TOP_FILES = ("compose.yaml", "compose.sim.yaml")
ALL_FILES = (*TOP_FILES, "monitoring.yaml")

Obj = dict[str, Any]


@cache
def compose_schema() -> Obj:
    try:
        resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.fail("the compose-spec schema comes with check-jsonschema: pip install -e '.[dev]'")
    schema: Obj = json.loads((resource / "compose-spec.json").read_text())
    return schema


@cache
def validator() -> jsonschema.protocols.Validator:
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def project(name: str) -> Obj:
    """A top-level compose file with its ``include`` files merged (services, volumes)."""
    doc = load_yaml(COMPOSE / name)
    merged = copy.deepcopy(doc)
    for include in doc.get("include", []):
        path = include if isinstance(include, str) else include["path"]
        included = load_yaml(COMPOSE / path)
        for section in ("services", "volumes", "networks"):
            for key, value in included.get(section, {}).items():
                assert key not in merged.get(section, {}), f"{name}: {section}.{key} twice"
                merged.setdefault(section, {})[key] = value
    return merged


_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose interpolation with no variables set: ``${VAR:-default}`` -> ``default``."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", value)


def hostnames(services: Obj) -> dict[str, str]:
    """Name or network alias -> service."""
    names = {name: name for name in services}
    for name, service in services.items():
        networks = service.get("networks", {})
        if isinstance(networks, dict):
            for network in networks.values():
                for alias in (network or {}).get("aliases", []):
                    names[alias] = name
    return names


def container_ports(service: Obj) -> set[int]:
    ports = {int(str(p)) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[-1].split("/")[0]))
    return ports


# ------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("name", ALL_FILES)
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    doc = load_yaml(COMPOSE / name)
    errors = sorted(validator().iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(
        f"{name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors
    )


def test_compose_schema_catches_mistakes() -> None:
    """A misspelled service key fails the schema: the test above can fail."""
    doc = load_yaml(COMPOSE / "compose.yaml")
    doc["services"]["concur"]["stop_grace_periode"] = "40s"
    assert list(validator().iter_errors(doc))
    doc = load_yaml(COMPOSE / "compose.yaml")
    doc["services"]["vllm"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities")
    assert list(validator().iter_errors(doc))


# --------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("name", ALL_FILES)
def test_bind_mounts_and_builds_point_at_real_files(name: str) -> None:
    doc = load_yaml(COMPOSE / name)
    for sname, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {sname} mounts missing {source}"
        build = service.get("build")
        if build is not None:
            context = (COMPOSE / build["context"]).resolve()
            assert context == REPO, f"{sname}: build context {context} is not the repository"
            assert (context / build["dockerfile"]).resolve() == DOCKERFILE


@pytest.mark.parametrize("name", TOP_FILES)
def test_prometheus_scrapes_services_of_the_project(name: str) -> None:
    services = project(name)["services"]
    names = hostnames(services)
    prometheus = load_yaml(COMPOSE / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert set(jobs) == {"concur", "vllm"}
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                assert host in names, f"{name}: no service or alias {host!r} for {target}"
                ports = container_ports(services[names[host]])
                assert int(port) in ports, f"{name}: {names[host]} does not listen on {port}"


@pytest.mark.parametrize("name", TOP_FILES)
def test_concur_config_points_at_the_engine_service(name: str) -> None:
    services = project(name)["services"]
    concur = services["concur"]
    mounts = dict(v.split(":")[:2] for v in concur["volumes"])
    assert mounts["./concur.toml"] == "/etc/concur/concur.toml"
    settings = load_settings(COMPOSE / "concur.toml", env={})
    host_port = settings.upstream.url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    engine = hostnames(services)[host]
    assert int(port) in container_ports(services[engine])
    assert engine in concur["depends_on"]
    assert concur["depends_on"][engine]["condition"] == "service_healthy"
    assert concur["command"] == ["--listen", "0.0.0.0:9000"]
    assert "9000:9000" in concur["ports"]
    # concur's drain (SIGTERM -> in-flight requests finish) fits in the stop grace period.
    assert settings.server.drain_timeout < int(concur["stop_grace_period"].removesuffix("s"))


def test_gpu_stack_runs_vllm_on_a_reserved_gpu() -> None:
    vllm = project("compose.yaml")["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    command = vllm["command"]
    assert command[command.index("--model") + 1] == "${MODEL:-Qwen/Qwen3-8B}"
    device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "ports" not in vllm, "vLLM must not be reachable from outside: agents go via concur"


def test_sim_stack_needs_no_gpu_and_runs_concur_engine() -> None:
    services = project("compose.sim.yaml")["services"]
    assert all("deploy" not in s for s in services.values())
    engine = services["engine"]
    assert engine["entrypoint"] == ["concur", "engine"]
    command = [str(a) for a in engine["command"]]
    assert command[command.index("--speed") + 1] == "20"
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_sim_engine_command_builds_a_concur_engine() -> None:
    """The engine's arguments, variables at their defaults, parse with `concur engine`'s own
    parser and describe an engine the simulator can build."""
    if importlib.util.find_spec("concur.sim.server.cli") is None:
        pytest.skip("this checkout has no concur.sim.server (concur engine) yet")
    from concur.sim.server import cli as engine_cli

    engine = project("compose.sim.yaml")["services"]["engine"]
    parser = argparse.ArgumentParser(prog="concur engine")
    engine_cli.add_arguments(parser)
    args = parser.parse_args([interpolate(str(a)) for a in engine["command"]])
    assert (args.host, args.port, args.speed) == ("0.0.0.0", 8000, 20.0)
    assert args.model_name == "Qwen/Qwen3-8B"  # the GPU stack's default model id
    config = engine_cli.config_from_args(args)
    assert config.spec.kv_capacity_tokens == 300_000


def test_interpolate() -> None:
    assert interpolate("${MODEL:-Qwen/Qwen3-8B}") == "Qwen/Qwen3-8B"
    assert interpolate("a${X-1}b${Y:-}c") == "a1bc"


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = load_yaml(COMPOSE / "monitoring.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    dashboards_in_container = mounts["../grafana"]
    assert (COMPOSE / "../grafana").resolve() == DASHBOARD.parent
    provisioning = COMPOSE / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    providers = load_yaml(provisioning / "dashboards" / "concur.yaml")["providers"]
    assert [p["options"]["path"] for p in providers] == [dashboards_in_container]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090")
    ]
    prometheus = load_yaml(COMPOSE / "monitoring.yaml")["services"]["prometheus"]
    assert "127.0.0.1:9090:9090" in prometheus["ports"]
    assert Path(COMPOSE / "prometheus.yml").is_file()
