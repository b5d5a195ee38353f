"""Configuration on the command line: ``--config``, ``--set``, command flags, ``--listen``.

Commands add the arguments with :func:`add_config_arguments` and load with
:func:`settings_from_args`, which prints every problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from concur.config import CONFIG_ENV_VAR, ConfigError, Settings, load_settings, parse_set_value

LISTEN_KEYS = ("server.host", "server.port")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` and repeatable ``--set KEY=VALUE`` to a command's parser."""
    group = parser.add_argument_group("configuration")
    group.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML or YAML config file (default: ${CONFIG_ENV_VAR}, if set)",
    )
    group.add_argument(
        "--set",
        dest="config_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "override one setting by dotted key, e.g. --set policy.aimd.high=0.9; "
            "repeatable; the value is read as JSON when it parses, else as text"
        ),
    )


def parse_listen(value: str) -> tuple[str, int]:
    """``"0.0.0.0:9000"``, ``"[::1]:9000"``, ``":9000"`` (host kept) -> ``(host, port)``.

    An empty host means "keep the configured one" and is returned as ``""``.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        raise ConfigError(f"--listen = {value!r}: expected HOST:PORT, e.g. 0.0.0.0:9000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"--listen = {value!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def settings_from_args(args: argparse.Namespace, /, **flag_overrides: Any) -> Settings:
    """Settings for a command: its flags > ``--set`` > env > ``--config`` file > defaults.

    ``flag_overrides`` map dotted keys (or ``section__field``) to command flag values;
    ``None`` means the flag was not given. ``listen="host:port"`` sets server.host/port,
    and is refused beside ``--set server.host`` or ``--set server.port``. On a bad
    configuration, prints every problem to stderr and raises ``SystemExit(2)``.
    """
    sets: list[str] = list(getattr(args, "config_set", None) or [])
    problems: list[str] = []
    flags: dict[str, tuple[Any, str]] = {}
    for key, value in flag_overrides.items():
        if value is None:
            continue
        if key == "listen":
            problems += _listen(str(value), sets, flags)
        else:
            dotted = key.replace("__", ".")
            flags[dotted] = (value, f"command-line flag for {dotted}")
    try:
        settings = load_settings(getattr(args, "config", None), sets=sets, flags=flags)
    except ConfigError as exc:
        _fail([*problems, *exc.problems])
    if problems:
        _fail(problems)
    return settings


def _listen(value: str, sets: Sequence[str], flags: dict[str, tuple[Any, str]]) -> list[str]:
    """Add ``--listen``'s host and port to ``flags``; the problems it has, if any."""
    try:
        host, port = parse_listen(value)
    except ConfigError as exc:
        return exc.problems
    clashes = sorted(set(_listen_sets(sets)))
    if clashes:
        given = " and ".join(f"--set {key}" for key in clashes)
        return [
            f"--listen {value} and {given} both set the listen address; give one: "
            "--listen HOST:PORT, or --set server.host=HOST --set server.port=PORT"
        ]
    if host:
        flags["server.host"] = (host, "--listen")
    flags["server.port"] = (port, "--listen")
    return []


def _listen_sets(sets: Sequence[str]) -> Iterator[str]:
    """The ``--set`` keys that set ``server.host`` or ``server.port``."""
    for item in sets:
        key, _, raw = item.partition("=")
        key = key.strip().lower().replace("__", ".")
        if key in LISTEN_KEYS:
            yield key
        elif key == "server":
            value = parse_set_value(raw)
            if isinstance(value, dict) and {"host", "port"} & set(value):
                yield key


def _fail(problems: Sequence[str]) -> NoReturn:
    print("concur: invalid configuration:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    raise SystemExit(2)
