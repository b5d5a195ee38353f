"""``concur engine``: run the simulated vLLM server.

Also runnable on its own: ``python -m concur.sim.server.cli --speed 20``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from concur.sim.cli import scheduling_policy_arg
from concur.sim.server.faults import COMPLETION_FAULTS, METRICS_FAULTS

__all__ = ["add_arguments", "config_from_args", "main", "register", "run"]

DESCRIPTION = (
    "Run a simulated vLLM server: the OpenAI API (/v1/chat/completions, /v1/completions, "
    "/v1/models), /health and vLLM's /metrics, driven by concur's engine model (paged KV "
    "blocks, prefix caching with LRU eviction, continuous batching, recompute preemption, "
    "roofline step time) in scaled wall-clock time. Prompts are tokenized deterministically, "
    "so an agent that re-sends its context hits the prefix cache and one whose prefix was "
    "evicted recomputes it. Example: concur engine --model llama-3-8b --tp 1 "
    "--kv-tokens 200000 --speed 20 --port 8000"
)


def register(sub: Any) -> None:
    """Add ``concur engine`` to the top-level subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "engine",
        help="run a simulated vLLM server (OpenAI API and vLLM /metrics), no GPU needed",
        description=DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    eng = p.add_argument_group("engine (as in 'concur sim')")
    eng.add_argument("--model", default="qwen3-32b", help="llama-3-8b, qwen3-8b, qwen3-32b, ...")
    eng.add_argument("--gpu", default="h100", help="h100, h200 or a100")
    eng.add_argument("--tp", type=int, default=2, help="tensor-parallel degree")
    eng.add_argument(
        "--kv-tokens", type=int, default=None, help="KV capacity in tokens (default: from memory)"
    )
    eng.add_argument(
        "--max-num-seqs", type=int, default=None, help="default: 256 (with --vllm: 128)"
    )
    eng.add_argument(
        "--preset",
        default=None,
        metavar="NAME",
        help=(
            "a measured engine instead of --model/--gpu/--tp: cpu-tiny (vLLM's CPU build "
            "serving concur's tiny model, as 'concur engine --vllm' runs it)"
        ),
    )
    eng.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="default: 8192 (--vllm: 2048)"
    )
    scheduling_policy_arg(eng, also=" (with --vllm too)")
    real = p.add_argument_group("a real vLLM instead of the simulated engine")
    real.add_argument(
        "--vllm",
        action="store_true",
        help=(
            "run a real vLLM server (its CPU build, from .venv-vllm: make vllm-venv) with a "
            "small model made on this machine, and a KV cache of --kv-tokens (default 32768, "
            "in 128-token blocks); --model, --gpu, --tp, --speed and faults do not apply"
        ),
    )
    real.add_argument(
        "--vllm-log", type=Path, default=None, help="vLLM's own output (default: a temp file)"
    )
    srv = p.add_argument_group("server")
    srv.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per wall second: 20 runs twenty times faster than real time",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    srv.add_argument(
        "--model-name", default=None, help="served model id (default: concur-sim/MODEL)"
    )
    srv.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output accepted (default: what the KV cache holds)",
    )
    srv.add_argument(
        "--default-max-tokens",
        type=int,
        default=256,
        help="output tokens of a request without max_tokens",
    )
    srv.add_argument(
        "--chunk-interval",
        type=float,
        default=0.01,
        help=(
            "least wall seconds between two streamed chunks of one request; tokens made "
            "meanwhile go out together (0: one chunk per engine step)"
        ),
    )
    srv.add_argument(
        "--drain-timeout", type=float, default=5.0, help="seconds to finish requests at shutdown"
    )
    srv.add_argument("--log-format", choices=("text", "json"), default="text")
    srv.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    flt = p.add_argument_group("fault injection (also POST /sim/faults at run time)")
    flt.add_argument(
        "--fault-metrics", choices=METRICS_FAULTS, default=None, help="break GET /metrics"
    )
    flt.add_argument(
        "--fault-completions",
        choices=COMPLETION_FAULTS,
        default=None,
        help="break the completion endpoints",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~concur.sim.server.app.EngineServerConfig` the flags describe.

    Raises ValueError (naming the flag's value) for an impossible configuration.
    """
    from concur.sim.cli import engine_spec
    from concur.sim.server.app import EngineServerConfig
    from concur.sim.server.faults import Faults

    spec = engine_spec(args)  # the flags mean what they mean to `concur sim`
    spec.build()  # fail now on an unknown model or GPU, or a bad capacity
    return EngineServerConfig(
        spec=spec,
        speed=args.speed,
        model_name=args.model_name,
        max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens,
        faults=Faults.parse(args.fault_metrics, args.fault_completions),
        drain_timeout=args.drain_timeout,
        chunk_interval=args.chunk_interval,
    )


def run(args: argparse.Namespace) -> int:
    if args.vllm:
        from concur.sim.realvllm.cli import run_vllm

        return run_vllm(args)
    from concur.logs import setup_logging
    from concur.sim.server.app import EngineServer, serve_engine

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"concur engine: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_format, args.log_level)

    def ready(server: EngineServer) -> None:
        state = server.state
        print(
            f"concur engine: serving {state.model_name} at {server.url} "
            f"({config.spec.describe()}, speed {config.speed:g}x)",
            flush=True,
        )

    try:
        return asyncio.run(serve_engine(config, args.host, args.port, ready=ready))
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m concur.sim.server.cli``: the same command without the ``concur`` front."""
    parser = argparse.ArgumentParser(prog="concur engine", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
