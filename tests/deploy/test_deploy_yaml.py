"""Every YAML file under deploy/ passes yamllint with deploy/.yamllint.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_support import DEPLOY
from yamllint import linter
from yamllint.config import YamlLintConfig

CONFIG = DEPLOY / ".yamllint.yaml"


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@pytest.fixture(scope="module")
def config() -> YamlLintConfig:
    return YamlLintConfig(file=str(CONFIG))


def test_every_deploy_yaml_file_is_linted() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in yaml_files()}
    # A glob that silently found nothing would make the lint test pass vacuously.
    expected = {
        ".yamllint.yaml",
        "compose/compose.yaml",
        "compose/compose.sim.yaml",
        "compose/monitoring.yaml",
        "compose/prometheus.yml",
        "compose/grafana/provisioning/datasources/prometheus.yaml",
        "compose/grafana/provisioning/dashboards/concur.yaml",
        "kubernetes/kustomization.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/podmonitor.yaml",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yamllint_clean(path: Path, config: YamlLintConfig) -> None:
    problems = list(linter.run(path.read_text(), config, str(path)))
    report = "\n".join(f"{path}:{p.line}:{p.column}: [{p.level}] {p.message}" for p in problems)
    assert not problems, report


def test_yamllint_config_catches_problems(config: YamlLintConfig) -> None:
    bad = "services:\n   web:\n     image: x  \n     restart: yes\n"
    rules = {p.rule for p in linter.run(bad, config, "bad.yaml")}
    assert {"indentation", "trailing-spaces", "truthy"} <= rules, rules
