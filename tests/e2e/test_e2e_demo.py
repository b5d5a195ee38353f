"""``concur demo``: the quick scenario end to end, and no child process outlives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from concur.sim.procs import ChildFailed, Supervisor, wait_http

DEMO = [sys.executable, "-m", "concur", "demo"]
SLEEPER = "import time; time.sleep(120)"


def _children(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.add(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait(pred: object, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_demo_quick_shows_concur_ahead(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*DEMO, "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "demo.json").read_text())
    direct = data["runs"]["no control"]
    controlled = data["runs"]["concur (aimd)"]
    d, c = direct["figures"], controlled["figures"]
    assert d["finished_agents"] == c["finished_agents"] == d["agents"] == 20
    assert d["errors"] == c["errors"] == {}
    # The controlled run is not slower, keeps the cache warm and recomputes less.
    assert c["makespan_s"] <= d["makespan_s"]
    assert c["hit_rate"] > d["hit_rate"]
    assert c["recomputed_tokens"] < d["recomputed_tokens"]
    status = controlled["proxy_status"]
    assert (status["active"], status["queued"]) == (0, 0)
    windows = [s["window"] for s in controlled["samples"] if s["window"] is not None]
    assert windows and min(windows) < max(windows)  # the window moved during the run
    assert all(s["window"] is None for s in direct["samples"])
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    out = proc.stdout
    assert "makespan (simulated s)" in out and "recomputed prompt tokens" in out
    assert data["meta"]["urls"]["status"] in out and data["meta"]["urls"]["metrics"] in out
    assert "what to try next" in out
    for name in ("engine-direct", "engine-concur", "concur-serve"):
        assert (tmp_path / "logs" / f"{name}.log").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)]
)
def test_interrupted_demo_leaves_no_child(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    # At 100x the first half is over in seconds; interrupt the second, engine + proxy up.
    # SIGINT as a terminal's Ctrl-C finds it: a runner started in the background by a
    # non-interactive shell ignores SIGINT, and its children inherit that.
    proc = subprocess.Popen(
        [*DEMO, "--quick", "--speed", "100", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_default_sigint,
    )
    try:
        serve_log = tmp_path / "logs" / "concur-serve.log"
        _wait(lambda: serve_log.exists() and len(_children(proc.pid)) == 2, 120, "engine + proxy")
        children = _children(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert children and not [p for p in children if _alive(p)]


def test_supervisor_stops_children_and_grandchildren(tmp_path: Path) -> None:
    spawner = (
        f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]); {SLEEPER}"
    )
    with Supervisor(tmp_path, grace=2.0) as sup:
        child = sup.start("spawner", [sys.executable, "-c", spawner])
        _wait(lambda: len(_children(child.pid)) == 1, 10, "the grandchild")
        grandchild = next(iter(_children(child.pid)))
        plain = sup.start("plain", [sys.executable, "-c", SLEEPER])
        assert _alive(child.pid) and _alive(grandchild) and _alive(plain.pid)
    assert not _alive(child.pid) and not _alive(grandchild) and not _alive(plain.pid)
    assert sup.children == []


def test_supervisor_cleans_up_after_an_error(tmp_path: Path) -> None:
    pids = []
    with pytest.raises(RuntimeError, match="boom"), Supervisor(tmp_path) as sup:
        pids.append(sup.start("sleeper", [sys.executable, "-c", SLEEPER]).pid)
        raise RuntimeError("boom")
    assert pids and not _alive(pids[0])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM)
    )


def test_a_child_that_dies_early_is_reported_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('concur engine: error: --kv-tokens must be >= 32'); sys.exit(2)"
    with Supervisor(tmp_path) as sup:
        child = sup.start("engine", [sys.executable, "-c", script])
        with pytest.raises(ChildFailed, match=r"(?s)exited with code 2.*kv-tokens must be"):
            wait_http(child, "http://127.0.0.1:9/health", timeout=30)
    assert os.path.exists(tmp_path / "engine.log")
