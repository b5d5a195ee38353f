"""``concur config``: print the effective configuration, or a commented example file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from concur._cli_config import add_config_arguments, settings_from_args
from concur.config import render_effective, render_example


def register(sub: Any) -> None:
    """Add ``concur config {show,example}`` to the top-level subparsers."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "config",
        help="show the effective configuration or print an example config file",
        description=(
            "Inspect concur's configuration. Settings come from command-line flags "
            "(--set KEY=VALUE), then CONCUR_* environment variables (e.g. "
            "CONCUR_POLICY__AIMD__HIGH=0.9), then a TOML or YAML file (--config or "
            "$CONCUR_CONFIG), then the defaults."
        ),
    )
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")

    show = actions.add_parser(
        "show",
        help="print the effective configuration (admin token masked)",
        description=(
            "Load and validate the configuration from every source and print the result. "
            "Exits with code 2 and names each bad field if it is invalid."
        ),
    )
    add_config_arguments(show)
    show.add_argument(
        "--format",
        choices=("toml", "json", "yaml"),
        default="toml",
        help="output format (default: toml)",
    )
    show.set_defaults(func=_show)

    example = actions.add_parser(
        "example",
        help="print a commented example config file (TOML) with every setting",
        description="Print every setting with its default and meaning, as a TOML file.",
    )
    example.set_defaults(func=_example)

    def _help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=_help)


def _show(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    sys.stdout.write(render_effective(settings, args.format))
    return 0


def _example(args: argparse.Namespace) -> int:
    sys.stdout.write(render_example())
    return 0
