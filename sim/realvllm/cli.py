"""``concur engine --vllm``: a real vLLM server in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType

from concur.sim.realvllm.server import (
    BLOCK_SIZE,
    VllmServer,
    VllmServerConfig,
    VllmStartError,
    find_vllm_python,
    kv_blocks_for,
    make_model,
)

DEFAULT_KV_TOKENS = 32_768

_NOT_FOR_VLLM = (
    ("speed", 1.0, "--speed (a real engine runs in real time)"),
    ("fault_metrics", None, "--fault-metrics"),
    ("fault_completions", None, "--fault-completions"),
    ("preset", None, "--preset (it models this very engine for the simulator)"),
)


def config_from_args(args: argparse.Namespace, python: str) -> VllmServerConfig:
    """The server the flags describe, with the model made (or found) by ``python``."""
    for name, default, flag in _NOT_FOR_VLLM:
        if getattr(args, name) != default:
            raise ValueError(f"{flag} is for the simulated engine; it cannot apply with --vllm")
    kv_tokens = args.kv_tokens or DEFAULT_KV_TOKENS
    if kv_tokens < 2 * BLOCK_SIZE:
        raise ValueError(f"--kv-tokens must be >= {2 * BLOCK_SIZE} with --vllm, got {kv_tokens}")
    given = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "served_model_name": args.model_name,
    }
    return VllmServerConfig(
        model=make_model(python),
        kv_blocks=kv_blocks_for(kv_tokens),
        max_model_len=args.max_model_len,
        host=args.host,
        port=args.port,
        python=python,
        scheduling_policy=args.scheduling_policy,
        **{k: v for k, v in given.items() if v},  # the server's defaults otherwise
    )


class _Terminated(Exception):
    """SIGTERM: stop the server and exit 0, as ``concur serve`` does."""


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def run_vllm(args: argparse.Namespace) -> int:
    try:
        python = find_vllm_python()
        print(f"concur engine: making (or finding) the model with {python} ...", flush=True)
        config = config_from_args(args, python)
    except (ValueError, VllmStartError) as exc:
        print(f"concur engine: error: {exc}", file=sys.stderr)
        return 2
    server = VllmServer(config, log_path=args.vllm_log)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        print(
            f"concur engine: starting vLLM on {config.host}:{config.port or '(a free port)'} "
            "(35-90 s) ...",
            flush=True,
        )
        server.start()
        print(
            f"concur engine: vLLM serving {config.served_model_name} at {server.url} "
            f"(KV cache {config.kv_blocks} blocks x {BLOCK_SIZE} = "
            f"{config.capacity_tokens:,} tokens, max model len {config.model_len:,}; "
            f"log: {server.log_path}). Ctrl-C stops it.",
            flush=True,
        )
        while server.running():
            time.sleep(0.5)
        print(
            f"concur engine: vLLM exited on its own:\n{server.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except VllmStartError as exc:
        print(f"concur engine: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("concur engine: stopping vLLM ...", file=sys.stderr, flush=True)
        return 130
    except _Terminated:
        print("concur engine: SIGTERM, stopping vLLM ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
