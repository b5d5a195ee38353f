"""Checks of single values the settings models share: URLs, CA files, agent-id sources."""

from __future__ import annotations

import os
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

IDENTITY_BODY_FIELDS = ("session_id", "user")

# RFC 9110 token characters: what a header name may contain.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def http_url(value: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL, without a trailing slash."""
    text = value.strip()
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}); use e.g. http://127.0.0.1:8000") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000"
        )
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    return text.rstrip("/")


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context for an https engine that trusts ``ca_file`` too (None: the default)."""
    if ca_file is None:
        return None
    if not os.path.isfile(ca_file):
        raise ValueError(f"{ca_file}: no such file; give a PEM file of CA certificates")
    context = ssl.create_default_context()  # the system's CAs
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"{ca_file}: not a readable PEM file of CA certificates ({exc}); "
            "give the CA that signed the engine's certificate, in PEM"
        ) from None
    return context


def split_list(value: Any) -> Any:
    """Accept ``"a,b"`` (handy in env vars and ``--set``) where a list is expected."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def header_name(value: str) -> str:
    if not _TOKEN.match(value.strip()):
        raise ValueError("must be a valid HTTP header name (letters, digits, '-', ...)")
    return value.strip()


def identity_specs(specs: list[str]) -> list[str]:
    """``header:<Name>`` or ``body:<field>`` entries, normalised, none twice."""
    out: list[str] = []
    for i, spec in enumerate(specs):
        kind, sep, name = spec.strip().partition(":")
        kind, name = kind.strip().lower(), name.strip()
        if kind == "header" and sep and _TOKEN.match(name):
            norm = f"header:{name}"
        elif kind == "body" and name in IDENTITY_BODY_FIELDS:
            norm = f"body:{name}"
        else:
            raise ValueError(
                f"entry {i} ({spec!r}) must be header:<Name> (a valid header name) "
                f"or one of {', '.join('body:' + f for f in IDENTITY_BODY_FIELDS)}"
            )
        if norm.lower() in (o.lower() for o in out):
            raise ValueError(f"entry {i} ({spec!r}) is listed twice")
        out.append(norm)
    return out
