"""Structured logging: one line per event, as JSON or as ``key=value`` text.

Code logs an event name as the message and its fields through :func:`event`::

    logs.event(log, "admission", outcome="admitted", agent="a1", waited=0.2)

``--log-format json`` prints ``{"ts": ..., "level": "info", "logger": ..., "event":
"admission", "outcome": "admitted", ...}``; ``text`` prints
``2025-01-01T00:00:00.000Z info  admission outcome=admitted agent=a1 waited=0.2`` (fields
that are ``None`` are left out of text lines; JSON lines keep them as ``null``).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["json", "text"]
FIELDS_ATTR = "concur_fields"
HANDLER_NAME = "concur"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={FIELDS_ATTR: fields}, stacklevel=2)


def _timestamp(record: logging.LogRecord) -> str:
    dt = datetime.fromtimestamp(record.created, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS_ATTR, None)
    return dict(fields) if isinstance(fields, dict) else {}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, _clean(value))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def _text_value(value: Any) -> str:
    value = _clean(value)
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), f"{record.levelname.lower():<5}", record.getMessage()]
        parts.extend(f"{k}={_text_value(v)}" for k, v in _fields(record).items() if v is not None)
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    fmt: LogFormat = "text", level: str | int = "info", stream: IO[str] | None = None
) -> logging.Handler:
    """Send ``concur`` (and aiohttp's) logs to ``stream`` (stderr) in ``fmt``.

    Called once by the CLI; replaces a handler installed by an earlier call.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    lvl = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    for name in ("concur", "aiohttp"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(lvl if name == "concur" else max(lvl, logging.WARNING))
        logger.propagate = False
    return handler
