"""Packaging: adapters, policies and sim exist only as concur.adapters etc."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("adapters", "policies", "sim")


def test_subpackages_never_import_as_top_level_modules() -> None:
    code = (
        "import sys, concur.cli, concur.admission, concur.control, concur.policies, "
        "concur.adapters, concur.sim\n"
        "import pkgutil, importlib, concur\n"
        "for m in pkgutil.walk_packages(concur.__path__, 'concur.'):\n"
        "    importlib.import_module(m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {SUBPACKAGES!r})\n"
        "print(len([n for n in sys.modules if n.startswith('concur.')]))\n"
        "assert not bad, bad\n"
    )
    # Run from a neutral directory so the repository root is not on sys.path.
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) > 10


def test_subpackages_are_not_importable_as_top_level_names_in_tests() -> None:
    import importlib.util

    # tests/sim etc. may resolve as namespace packages; the repository's own folders must not.
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(name)
        where = [] if spec is None else list(spec.submodule_search_locations or [])
        assert str(ROOT / name) not in where, f"{ROOT / name} is importable as {name!r}"


def test_symlinks_are_relative() -> None:
    for name in SUBPACKAGES:
        link = ROOT / "concur" / name
        assert link.is_symlink(), f"concur/{name} must be a symlink to ../{name}"
        assert str(link.readlink()) == f"../{name}"


@pytest.mark.slow
def test_built_wheel_holds_the_subpackages(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    wheel = next(tmp_path.glob("concur-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES:
        assert f"concur/{pkg}/__init__.py" in names, f"concur/{pkg} missing from {wheel.name}"
        assert not any(n.startswith(f"{pkg}/") for n in names), f"top-level {pkg}/ in wheel"
    # Every Python file of the source tree (symlinked subpackages followed) is in the wheel.
    expected = {
        os.path.relpath(os.path.join(d, f), ROOT)
        for d, _, files in os.walk(ROOT / "concur", followlinks=True)
        for f in files
        if f.endswith(".py")
    }
    assert len(expected) > 40
    missing = sorted(expected - set(names))
    assert not missing, f"not packaged: {missing}"


def _concur_without(package: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``concur ARGV`` in a fresh interpreter where ``package`` cannot be imported."""
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from concur.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd="/", capture_output=True, text=True, check=False
    )


def test_the_proxy_needs_no_sim_extra_and_sim_commands_say_what_to_install() -> None:
    serve = _concur_without("numpy", "serve", "--help")
    assert serve.returncode == 0, serve.stderr
    assert "--upstream" in serve.stdout
    typo = _concur_without("numpy", "serve", "--upstreem", "http://x")
    assert typo.returncode == 2 and "unrecognized arguments: --upstreem http://x" in typo.stderr
    listing = _concur_without("numpy", "--help")
    assert listing.returncode == 0 and "concur[sim]" in listing.stdout
    for command, *rest in (
        ("sim", "run", "--trace", "t.jsonl"),
        ("engine", "--port", "8000"),
        ("swarm", "--shape", "small"),
        ("demo", "--quick"),
        ("demo",),
    ):
        out = _concur_without("numpy", command, *rest)
        assert out.returncode == 2, (command, out.stderr)
        assert "pip install 'concur[sim]'" in out.stderr and "numpy" in out.stderr
        assert "Traceback" not in out.stderr
