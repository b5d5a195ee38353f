"""concur's public surface: the names in ``concur.__all__``, imported on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import concur


def test_every_public_name_resolves_to_what_its_module_defines() -> None:
    assert concur.__all__ == sorted(concur.__all__)
    for name in concur.__all__:
        value = getattr(concur, name)
        assert getattr(value, "__name__", name) == name
    assert set(concur.__all__) <= set(dir(concur))
    with pytest.raises(AttributeError):
        _ = concur.NoSuchName  # type: ignore[attr-defined]


def test_import_concur_loads_neither_the_server_nor_the_config() -> None:
    code = (
        "import sys, concur; print(sorted(m for m in ('aiohttp', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
