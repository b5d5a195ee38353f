"""Fixtures for the deploy/ validation tests: parsed files, read once per session."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_support import KUBERNETES, load_yaml_docs


@pytest.fixture(scope="session")
def k8s_objects() -> dict[str, dict[str, Any]]:
    """The Kubernetes objects of deploy/kubernetes (not the kustomization), by ``Kind/name``."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_docs(path):
            key = f"{doc['kind']}/{doc['metadata']['name']}"
            assert key not in objects, f"{key} is defined twice"
            objects[key] = doc
    return objects
