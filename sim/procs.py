"""Child processes: start in their own session, wait until ready, and always clean up.

:class:`Supervisor` owns every child it starts. Each child runs in its own
process group (session), its output goes to a log file, and on exit (normal,
exception, Ctrl-C, SIGTERM, or interpreter exit via ``atexit``) every child's
group gets SIGTERM, then SIGKILL after a grace period. Use it as a context
manager::

    with Supervisor(log_dir) as sup:
        engine = sup.start("engine", [*engine_command(), "--port", "8000"])
        wait_http(engine, "http://127.0.0.1:8000/health")

:func:`spawn` starts one child outside a supervisor (its owner stops it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import httpx

__all__ = ["Child", "ChildFailed", "Supervisor", "free_port", "spawn", "wait_http"]


class ChildFailed(RuntimeError):
    """A child process exited early or never became ready (the message has its log tail)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    """One running child process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        if self.alive():
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=grace)
        # Anything left in the group (grandchildren) goes too, and is waited for.
        _signal_group(self.proc, signal.SIGKILL)
        _wait_group_gone(self.proc.pid, grace)
        with contextlib.suppress(OSError):
            self.log_file.close()
        return self.proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process is left in group ``pgid`` (killed ones vanish once reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def spawn(
    name: str, argv: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None
) -> Child:
    """Start ``argv`` in a new session (its own process group), output to ``log_path``.

    ``env`` is added to this process's environment.
    """
    log_file = log_path.open("wb")
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env,
        )
    except OSError:
        log_file.close()
        raise
    return Child(name, proc, log_path, log_file)


class Supervisor:
    """Starts children and guarantees they are gone when it exits.

    While active it installs SIGTERM (and, if it was the default, SIGINT)
    handlers that raise in the main thread so ``finally`` blocks run, plus an
    ``atexit`` hook; both are removed or restored on exit. A signal that arrives
    while a child is being started is held until the child is on the list, so
    a child forked but not yet recorded is never left behind.
    """

    def __init__(self, log_dir: Path, *, grace: float = 5.0) -> None:
        self.log_dir = log_dir
        self.grace = grace
        self.children: list[Child] = []
        self._old_handlers: dict[int, Any] = {}
        self._starting = False
        self._held: int | None = None

    def __enter__(self) -> Supervisor:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop_all)
        with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
            self._old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_signal)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
        atexit.unregister(self.stop_all)
        for signum, handler in self._old_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._old_handlers.clear()

    def start(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Child:
        """Start ``argv`` in a new session; its output goes to ``<log_dir>/<name>.log``."""
        self._starting = True
        try:
            child = spawn(name, argv, self.log_dir / f"{name}.log", env=env)
            self.children.append(child)
        finally:
            self._starting = False
        if self._held is not None:
            signum, self._held = self._held, None
            _raise_exit(signum)
        return child

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._starting:
            self._held = signum
            return
        _raise_exit(signum)

    def stop(self, child: Child) -> None:
        child.stop(self.grace)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        """Stop every child, newest first (the proxy before the engine behind it)."""
        while self.children:
            self.stop(self.children[-1])


def _raise_exit(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def wait_http(child: Child, url: str, *, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Wait until ``GET url`` answers 200; raise :class:`ChildFailed` if the child dies."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited with code {child.proc.returncode} before it was "
                    f"ready; its log ({child.log_path}) ends with:\n{child.log_tail()}"
                )
            try:
                resp = client.get(url)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(interval)
    raise ChildFailed(
        f"{child.name} did not answer {url} within {timeout:g} s (last: {last}); its log "
        f"({child.log_path}) ends with:\n{child.log_tail()}"
    )
