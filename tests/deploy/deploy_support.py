"""Helpers for the deploy/ validation tests (imported as ``deploy_support``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
DASHBOARD = DEPLOY / "grafana" / "concur.json"
DOCKERFILE = DEPLOY / "Dockerfile"
VLLM_FIXTURE = REPO / "tests" / "fixtures" / "metrics" / "vllm-0.33.0.txt"


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML file (all of deploy/'s documents are mappings)."""
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a YAML document is not a mapping: {doc!r}"
    return docs


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file holding exactly one mapping."""
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


# ------------------------------------------------------------------ PromQL metric names

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_TEMPLATE_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan"}
)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (function names, labels and keywords aside).

    Good enough for dashboards: label matchers, ranges, strings, Grafana variables and
    ``by (...)`` groupings are removed first; what is left that is not called is a metric.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _TEMPLATE_VAR.sub(" 0 ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.+?)\s*,\s*[\w.]+\s*\)\s*$")


def variable_query_metric_names(query: str) -> set[str]:
    """Metric names in a Grafana Prometheus variable query (``label_values(m, label)``)."""
    match = _LABEL_VALUES.match(query)
    if match is None:
        raise ValueError(f"unsupported variable query {query!r}: use label_values(metric, label)")
    return promql_metric_names(match.group(1))
