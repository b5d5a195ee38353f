"""Server processes for the benchmarks: start on a free loopback port, wait ready, read /proc.

CPU time and resident memory come from ``/proc/<pid>/stat`` and
``/proc/<pid>/status`` (no psutil), so they are Linux-only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid: int, key: str = "VmRSS") -> int:
    """A ``/proc/<pid>/status`` memory line in KiB (VmRSS: resident now; VmHWM: peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def machine() -> str:
    """``<nproc> x <CPU model name>`` from /proc/cpuinfo."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} x {model}"


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pin_away_from_the_model(group: int) -> str:
    """Keep everything but vLLM's model worker off the worker's cores.

    ``group`` is the vLLM server's process group (it was started in a session of its own).

    vLLM's CPU backend binds its model worker (``VLLM::Worker``) to its cores and leaves
    the others to the rest; its API server and engine core float, and so would this
    harness, concur and ThunderAgent. Pinning all of them to the cores the worker does
    not use keeps them from stealing its core mid-step: less noise from run to run.
    """
    worker_cpus: set[int] = set()
    others: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            pid = int(proc.name)
            if os.getpgid(pid) != group:
                continue
            name = (proc / "comm").read_text().strip()
        except (OSError, ProcessLookupError):
            continue
        if name.startswith("VLLM::Worker"):
            worker_cpus |= os.sched_getaffinity(pid)
        else:
            others.append(pid)
    rest = set(range(os.cpu_count() or 1)) - worker_cpus
    if not worker_cpus or not rest:
        return "not pinned (no model worker found, or it has every core)"
    for pid in [*others, os.getpid()]:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, rest)
    return f"model worker on cores {sorted(worker_cpus)}, everything else on {sorted(rest)}"


@dataclass
class Proc:
    """One server process started by the benchmark."""

    name: str
    argv: list[str]
    url: str
    ready_path: str = "/health"
    log_path: Path | None = None
    env: dict[str, str] | None = None
    profiled: bool = False
    """Runs under ``_profiled.py`` with PROFILE_ON_SIGNAL: :meth:`profile` switches it."""
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} is not started"
        return self.popen.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the process and wait until ``ready_path`` answers 200."""
        env = {**os.environ, **(self.env or {})}
        if self.log_path is None:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        else:
            with open(self.log_path, "wb") as out:  # the child keeps its own descriptor
                self.popen = subprocess.Popen(
                    self.argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
        deadline = time.monotonic() + timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.popen.returncode} during start-up; "
                    f"command: {' '.join(self.argv)}; log: {self.log_path or '(not kept)'}"
                )
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} did not answer {self.url}{self.ready_path} within {timeout}s; "
                    f"log: {self.log_path or '(not kept)'}"
                )
            time.sleep(0.1)

    def profile(self, on: bool) -> None:
        """Start (or stop) recording the profile of a :attr:`profiled` process."""
        if self.profiled:
            os.kill(self.pid, signal.SIGUSR1 if on else signal.SIGUSR2)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return memory_kib(self.pid) / 1024

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; the exit code."""
        if self.popen is None or self.popen.poll() is not None:
            return None if self.popen is None else self.popen.returncode
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
