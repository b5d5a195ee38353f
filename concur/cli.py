"""The ``concur`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# Subcommand modules and their command names, in the order ``concur --help``
# lists them.
COMMANDS = (
    ("concur.serve_cli", "serve"),
    ("concur.sim.cli", "sim"),
    ("concur.sim.server.cli", "engine"),
    ("concur.sim.swarm.cli", "swarm"),
    ("concur.sim.demo.cli", "demo"),
    ("concur.config_cli", "config"),
)


# Packages of the ``sim`` extra (pyproject.toml): the simulator's commands need
# them, the proxy does not. The simulator imports numpy on import, the others
# only when a command runs.
SIM_EXTRA = frozenset({"matplotlib", "numpy", "rich"})
SIM_ON_IMPORT = ("numpy",)


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
    missing = _first_missing(SIM_ON_IMPORT)
    for name, command in COMMANDS:
        if missing is not None and name.startswith("concur.sim."):
            # Installed without the simulator extra: the command says what to do.
            stub = sub.add_parser(command, help=f"(needs pip install 'concur[sim]': {missing})")
            stub.set_defaults(func=_missing_extra(command, missing), stub=True)
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _first_missing(packages: Sequence[str]) -> str | None:
    for package in packages:
        try:
            importlib.import_module(package)
        except ModuleNotFoundError:
            return package
    return None


def _missing_extra(command: str, package: str) -> Callable[[argparse.Namespace], int]:
    def explain(_: argparse.Namespace) -> int:
        print(
            f"concur {command}: needs {package}, which comes with the simulator extra: "
            "pip install 'concur[sim]'",
            file=sys.stderr,
        )
        return 2

    return explain


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # A stub takes any arguments (`concur demo --quick` without the extra still says what
    # to install); every real command is parsed strictly.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "stub", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 0
    try:
        code: int = func(args)
    except ModuleNotFoundError as exc:
        if exc.name not in SIM_EXTRA:
            raise
        return _missing_extra(args.command, exc.name)(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
