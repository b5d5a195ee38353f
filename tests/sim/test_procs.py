"""concur.sim.procs: children started by a Supervisor are gone when it exits, however it exits."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from concur.sim import procs
from concur.sim.procs import Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_children_stop_when_the_block_exits(tmp_path: Path) -> None:
    with Supervisor(tmp_path) as sup:
        child = sup.start("sleeper", SLEEPER)
        assert _running(child.pid)
    assert not _running(child.pid)
    assert (tmp_path / "sleeper.log").exists()


def test_sigterm_while_a_child_starts_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The signal lands after the fork and before the child is on the list: the
    # moment a child used to be left running.
    real_spawn = procs.spawn
    started: list[int] = []

    def spawn_then_signal(*args: Any, **kwargs: Any) -> procs.Child:
        child = real_spawn(*args, **kwargs)
        started.append(child.pid)
        os.kill(os.getpid(), signal.SIGTERM)
        return child

    monkeypatch.setattr(procs, "spawn", spawn_then_signal)
    with pytest.raises(SystemExit) as exc, Supervisor(tmp_path) as sup:
        sup.start("sleeper", SLEEPER)
        pytest.fail("the held SIGTERM was not raised once the child was recorded")
    assert exc.value.code == 128 + signal.SIGTERM
    assert started and not _running(started[0])
    assert signal.getsignal(signal.SIGTERM) != sup._on_signal
