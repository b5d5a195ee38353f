"""Run one trace under several policies, in parallel processes, with progress."""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from concur.policies.registry import PolicySettings, build_policy
from concur.sim.engine import EngineModel
from concur.sim.engine_config import EngineSpec
from concur.sim.runner import Runner, RunOptions, RunResult
from concur.sim.trace import Trace


@dataclass(frozen=True)
class Job:
    """One policy run: everything a worker process needs, picklable."""

    label: str
    spec: str
    trace: Trace
    engine: EngineSpec
    settings: PolicySettings = field(default_factory=PolicySettings)
    options: RunOptions = field(default_factory=RunOptions)
    seed: int = 0
    engine_kind: str = "builtin"


ProgressFn = Callable[[str, int, int], None]


def run_job(job: Job, progress: ProgressFn | None = None) -> RunResult:
    """Run one job in this process."""
    engine: Any
    if job.engine_kind == "vllm":
        engine = _vllm_engine(job.engine)
    else:
        engine = EngineModel(job.engine.build())
    policy = build_policy(job.spec, job.settings)
    report = None if progress is None else (lambda done, total: progress(job.label, done, total))
    runner = Runner(
        job.trace,
        engine,
        policy,
        options=job.options,
        seed=job.seed,
        block_size=job.engine.block_size,
        progress=report,
        request_overhead=job.engine.request_overhead,
    )
    result = runner.run()
    result.summary = _relabel(result, job.label)
    return result


def _vllm_engine(spec: EngineSpec) -> Any:
    """vLLM's own scheduler behind the runner's engine interface (the ``vllm`` extra)."""
    try:
        module = importlib.import_module("concur.sim.vllm_engine")
    except ImportError as exc:
        raise RuntimeError(
            f"--engine vllm needs the vllm extra: pip install 'concur[vllm]' ({exc})"
        ) from exc
    return module.VllmEngine(spec)


def _relabel(result: RunResult, label: str) -> Any:
    from dataclasses import replace

    return replace(result.summary, policy=label)


def _worker(job: Job, q: Any) -> RunResult:
    last = [0.0]

    def progress(label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 0.2:
            last[0] = now
            q.put((label, done, total))

    return run_job(job, progress)


def run_jobs(
    jobs: Sequence[Job],
    *,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> list[RunResult]:
    """Run jobs, in parallel processes when more than one core and job; keeps job order."""
    workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        return [run_job(j, progress) for j in jobs]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures: list[Future[RunResult]] = [pool.submit(_worker, j, q) for j in jobs]
            while not all(f.done() for f in futures):
                _drain(q, progress, timeout=0.1)
            _drain(q, progress, timeout=0.0)
            return [f.result() for f in futures]


def _drain(q: Any, progress: ProgressFn | None, timeout: float) -> None:
    try:
        item = q.get(timeout=timeout) if timeout else q.get_nowait()
    except queue.Empty:
        return
    while True:
        if progress is not None:
            progress(*item)
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
