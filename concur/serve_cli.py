"""``concur serve``: run the admission-control proxy in front of one engine."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from concur._cli_config import add_config_arguments, settings_from_args
from concur.logs import setup_logging
from concur.policies.registry import POLICY_SPECS


def register(sub: Any) -> None:
    """Add ``concur serve`` to the top-level subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the proxy: agents point their OpenAI base URL at it",
        description=(
            "Run concur as a sidecar proxy in front of one OpenAI-compatible engine. "
            "Agents send requests to concur instead of the engine; new agents are admitted "
            "only while the engine's KV cache can hold them. Example: "
            "concur serve --upstream http://127.0.0.1:8000 --policy aimd"
        ),
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="the engine's base URL (upstream.url; default http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (server.host/server.port; default 127.0.0.1:9000)",
    )
    parser.add_argument(
        "--policy",
        metavar="SPEC",
        help=f"admission policy: {POLICY_SPECS} (policy.name)",
    )
    parser.add_argument(
        "--engine",
        metavar="KIND",
        help="engine kind for reading its load: vllm, sglang or llamacpp (engine.kind)",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="log line format (server.log_format; default text)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="least severe level logged (server.log_level; default info)",
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(
        args,
        **{
            "upstream.url": args.upstream,
            "listen": args.listen,
            "policy.name": args.policy,
            "engine.kind": args.engine,
            "server.log_format": args.log_format,
            "server.log_level": args.log_level,
        },
    )
    setup_logging(settings.server.log_format, settings.server.log_level)
    # Imported late: `concur --help` should not pay for aiohttp and the runtime.
    from concur.app import serve

    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:  # a second Ctrl-C during the drain
        return 130
