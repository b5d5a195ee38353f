"""The demo's child processes: ``concur engine`` and ``concur serve``, started and ready.

Process handling itself (sessions, logs, clean-up) is :mod:`concur.sim.procs`'s.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from concur.sim.procs import Child, Supervisor, free_port, wait_http

__all__ = ["concur_command", "engine_command", "start_concur", "start_engine"]


def concur_command() -> list[str]:
    """How to run this installation's ``concur`` command in a child process."""
    return [sys.executable, "-m", "concur"]


def engine_command() -> list[str]:
    """How to run ``concur engine`` in a child process."""
    return [*concur_command(), "engine"]


def start_engine(
    sup: Supervisor, name: str, engine_args: Sequence[str], *, timeout: float = 60.0
) -> tuple[Child, str]:
    """Start ``concur engine`` and wait until its ``/health`` answers.

    ``engine_args`` are the arguments after ``concur engine`` and must include
    ``--port N`` on 127.0.0.1; returns the child and its base URL.
    """
    port = _port_of(engine_args)
    child = sup.start(name, [*engine_command(), *engine_args])
    url = f"http://127.0.0.1:{port}"
    wait_http(child, f"{url}/health", timeout=timeout)
    return child, url


def start_concur(
    sup: Supervisor,
    name: str,
    upstream: str,
    *,
    policy: str,
    settings: Sequence[str] = (),
    timeout: float = 60.0,
) -> tuple[Child, str]:
    """Start ``concur serve`` in front of ``upstream`` and wait until ``/readyz`` says ready.

    ``settings`` are extra ``--set key=value`` arguments.
    """
    port = free_port()
    argv = [
        *concur_command(),
        "serve",
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
        "--policy",
        policy,
        "--log-level",
        "warning",
        *settings,
    ]
    child = sup.start(name, argv)
    url = f"http://127.0.0.1:{port}"
    wait_http(child, f"{url}/readyz", timeout=timeout)
    return child, url


def _port_of(args: Sequence[str]) -> int:
    items = list(args)
    try:
        return int(items[items.index("--port") + 1])
    except (ValueError, IndexError):
        raise ValueError(f"engine arguments need '--port N', got {items!r}") from None
