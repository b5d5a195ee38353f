"""Importers from public agent-trace formats to concur's native :class:`Trace`.

``import_trace(fmt, path, **options)`` reads ``path`` in format ``fmt`` (``None`` or
``"auto"``: detect it from the file's first line, then its extension). Formats:

- ``concur``: the native JSONL format (:mod:`concur.sim.trace`);
- ``tracelab-csv``: TraceLab replay CSV (:mod:`.tracelab_csv`);
- ``tracelab-rounds``: TraceLab ``round_trace.jsonl`` (:mod:`.tracelab_rounds`);
- ``mooncake``: Mooncake JSONL, sessions inferred from prefix extension (:mod:`.mooncake`);
- ``bailian``: Qwen-Bailian JSONL, sessions from ``parent_chat_id`` (:mod:`.bailian`).

``options`` are the keyword options of the format's loader (e.g. ``block_size`` or
``output_slack`` for ``mooncake``, ``align_sessions`` for ``tracelab-rounds``). Every
problem is a :class:`~concur.sim.trace.TraceError` naming the file, and the line and
field where there is one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from concur.sim.importers.bailian import load_bailian
from concur.sim.importers.mooncake import load_mooncake
from concur.sim.importers.tracelab_csv import COLUMNS as TRACELAB_COLUMNS
from concur.sim.importers.tracelab_csv import load_tracelab_csv
from concur.sim.importers.tracelab_rounds import load_tracelab_rounds
from concur.sim.trace import Trace, TraceError, load_trace

__all__ = ["Importer", "detect_format", "import_trace", "importers"]


@dataclass(frozen=True, slots=True)
class Importer:
    """One supported input format."""

    name: str
    description: str
    load: Callable[..., Trace]
    #: keys that identify the format in the first JSON object of a file
    json_keys: frozenset[str] = frozenset()

    def options(self) -> tuple[str, ...]:
        """Names of the keyword options the loader accepts."""
        parameters = inspect.signature(self.load).parameters.values()
        return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def importers() -> Mapping[str, Importer]:
    """The supported formats by name (a read-only view)."""
    table = (
        Importer(
            "concur",
            "concur native JSONL, one agent per line",
            load_trace,
            frozenset({"agent_id", "steps"}),
        ),
        Importer(
            "tracelab-csv",
            "TraceLab replay CSV (session_id,arrival_time,round_idx,...)",
            load_tracelab_csv,
        ),
        Importer(
            "tracelab-rounds",
            "TraceLab round_trace.jsonl (one agent round per line)",
            load_tracelab_rounds,
            frozenset({"session_id", "round_index", "input_tokens_total"}),
        ),
        Importer(
            "mooncake",
            "Mooncake JSONL (timestamp, input_length, output_length, hash_ids)",
            load_mooncake,
            frozenset({"timestamp", "input_length", "output_length", "hash_ids"}),
        ),
        Importer(
            "bailian",
            "Qwen-Bailian JSONL (chat_id, parent_chat_id, ..., hash_ids)",
            load_bailian,
            frozenset({"chat_id", "parent_chat_id", "timestamp", "hash_ids"}),
        ),
    )
    return MappingProxyType({importer.name: importer for importer in table})


def _formats_list() -> str:
    return ", ".join(importers())


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return line.strip()
    except OSError as exc:
        raise TraceError(str(path), f"cannot read trace file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise TraceError(str(path), f"not UTF-8 text: {exc.reason}") from None
    raise TraceError(str(path), "file is empty")


def detect_format(path: str | Path) -> str:
    """The format of ``path``, judged by its first non-blank line (JSON keys or a CSV
    header); raises :class:`TraceError` when that is ambiguous or unknown.
    """
    file = Path(path)
    first = _first_line(file)
    header = [cell.strip() for cell in first.split(",")]
    if all(column in header for column in TRACELAB_COLUMNS):
        return "tracelab-csv"
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        keys = set(obj)
        matches = [
            importer.name
            for importer in importers().values()
            if importer.json_keys and importer.json_keys <= keys
        ]
        # Bailian records also carry every Mooncake key: the more specific format wins.
        if "bailian" in matches:
            matches = [name for name in matches if name != "mooncake"]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise TraceError(
                str(path),
                f"format is ambiguous ({' or '.join(matches)}); pass one explicitly",
            )
    raise TraceError(
        str(path),
        f"cannot detect the trace format from its first line; pass one of: {_formats_list()}",
    )


def import_trace(fmt: str | None, path: str | Path, **options: Any) -> Trace:
    """Read ``path`` in format ``fmt`` (``None``/``"auto"`` to detect) as a :class:`Trace`."""
    name = detect_format(path) if fmt in (None, "auto") else str(fmt).strip().lower()
    table = importers()
    importer = table.get(name)
    if importer is None:
        raise TraceError(
            str(path), f"unknown trace format {fmt!r}; known formats: {_formats_list()}"
        )
    allowed = importer.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TraceError(
            str(path),
            f"unknown option(s) {', '.join(unknown)} for format {name!r}; "
            f"allowed: {', '.join(allowed) or 'none'}",
        )
    try:
        return importer.load(path, **options)
    except TraceError:
        raise
    except ValueError as exc:  # an invalid option value, e.g. output_slack=2
        raise TraceError(str(path), f"{name}: {exc}") from None
