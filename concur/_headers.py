"""Which headers cross the proxy: the hop-by-hop rule, once, with its fast path.

Hop-by-hop headers (RFC 9110 section 7.6.1: the fixed list, plus every name the
``Connection`` header lists) and ``Proxy-*`` headers belong to one hop and are never
forwarded, in either direction; a request also loses the headers the proxy
recomputes. :func:`filtered` is the fast copy, :func:`filtered_each` its
header-by-header specification (``tests/proxy/test_proxy_fastpath.py`` checks that
they agree).
"""

from __future__ import annotations

from multidict import CIMultiDict, MultiMapping

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_SKIP = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for"}
"""Request headers not copied: hop-by-hop, and those the proxy recomputes (or that only
make sense on the client's hop)."""
RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}
"""Response headers not copied. The upstream's Content-Length is set from the parsed
length, which is only known for a length-framed body (a chunked one may carry a stale
one too)."""


def skipped(headers: MultiMapping[str], base: frozenset[str]) -> frozenset[str]:
    """``base`` plus the names listed in ``headers``' Connection header (usually none)."""
    values = headers.getall("Connection", ())
    if not values:
        return base
    return base | {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def filtered(headers: MultiMapping[str], skip: frozenset[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without the names in ``skip`` and without ``Proxy-*``.

    ``skip`` holds lower-case names. Usually no name contains ``proxy-`` at all: then
    the copy and the removals are done by multidict in C (its keys compare without
    case, as ``name.lower()`` does for the ASCII names HTTP allows); otherwise each
    header is checked as in :func:`filtered_each`, the specification of this one.
    """
    if "proxy-" in ",".join(headers.keys()).lower():
        return filtered_each(headers, skip)
    out = CIMultiDict(headers)
    for name in headers.keys() & skip:
        out.popall(name, None)
    return out


def filtered_each(headers: MultiMapping[str], skip: frozenset[str]) -> CIMultiDict[str]:
    """:func:`filtered`, header by header."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in skip and not low.startswith("proxy-"):
            out.add(name, value)
    return out
