"""The ``concur`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order ``concur --help`` lists them.
COMMANDS = (
    "concur.serve_cli",
    "concur.sim.cli",
    "concur.sim.server.cli",
    "concur.sim.swarm.cli",
    "concur.sim.demo.cli",
    "concur.config_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concur",
        description=(
            "Agent-level admission control for LLM engines. concur sits in front of vLLM "
            "(or SGLang, llama.cpp), watches KV-cache pressure, and admits new agent "
            "sessions only while the cache can hold them, so agent swarms stop thrashing."
        ),
        epilog="Run 'concur COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    code: int = func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
