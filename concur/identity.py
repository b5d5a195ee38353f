"""Which agent a request belongs to: identity sources, extraction and validation.

An identity source is ``header:<Name>`` (a request header, case-insensitive) or
``body:<field>`` (a top-level string field of the JSON request body, such as
vLLM's ``session_id`` or OpenAI's ``user``). Sources are tried in the configured
order; the first one present wins. A present but unusable value (too long,
control characters) is an error the client must fix, never silently skipped:
skipping it would fold the request into another agent or make it anonymous.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["header", "body"]

DEFAULT_SOURCES = (
    "header:X-Concur-Agent-Id",
    "header:X-Session-Id",
    "header:session_id",
    "body:session_id",
)


class IdentityError(ValueError):
    """A request's agent identity that cannot be used; the message says which and why."""


@dataclass(frozen=True, slots=True)
class IdentitySource:
    """One place an agent id may be found."""

    kind: SourceKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_source(spec: str) -> IdentitySource:
    """``"header:X-Session-Id"`` -> ``IdentitySource("header", "X-Session-Id")``."""
    kind, sep, name = spec.strip().partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if not sep or not name or kind not in ("header", "body"):
        raise IdentityError(
            f"identity source {spec!r} must look like 'header:<Name>' or 'body:<field>'"
        )
    return IdentitySource("header" if kind == "header" else "body", name)


def parse_sources(specs: Iterable[str]) -> tuple[IdentitySource, ...]:
    return tuple(parse_source(s) for s in specs)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _has_control(value: str) -> bool:
    """Whether ``value`` has a C0 or C1 control character (or DEL)."""
    return _CONTROL.search(value) is not None


def validate(value: str, source: IdentitySource, max_bytes: int) -> str:
    """Return ``value`` if it is a usable agent id, else raise :class:`IdentityError`."""
    if len(value) <= max_bytes and value.isascii() and value.isprintable():
        # The usual id: printable ASCII (no control character) of one byte per character.
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise IdentityError(
            f"agent identity from {source} is {size} bytes; the limit is {max_bytes} "
            "(admission.max_identity_bytes): send a shorter id"
        )
    if _has_control(value):
        raise IdentityError(
            f"agent identity from {source} contains control characters; send a printable id"
        )
    return value


class IdentityExtractor:
    """Finds a request's agent id from headers and (optionally) its parsed JSON body."""

    def __init__(self, sources: Sequence[str | IdentitySource], max_bytes: int = 256) -> None:
        self.sources = tuple(
            s if isinstance(s, IdentitySource) else parse_source(s) for s in sources
        )
        self.max_bytes = max_bytes
        self._needs_body = any(s.kind == "body" for s in self.sources)

    @property
    def needs_body(self) -> bool:
        """Whether any source reads the request body."""
        return self._needs_body

    def extract(
        self, headers: Mapping[str, str], body: Mapping[str, object] | None
    ) -> tuple[str, IdentitySource] | None:
        """The first identity found (value, source), or ``None`` for an anonymous request.

        ``headers`` must be case-insensitive (aiohttp's ``CIMultiDictProxy``).
        Empty values count as absent; body values must be strings (or integers).
        """
        for source in self.sources:
            raw: object
            if source.kind == "header":
                raw = headers.get(source.name)
            else:
                raw = None if body is None else body.get(source.name)
                if isinstance(raw, int) and not isinstance(raw, bool):
                    raw = str(raw)
            if not isinstance(raw, str):
                continue
            value = raw.strip()
            if not value:
                continue
            return validate(value, source, self.max_bytes), source
        return None
