"""A deterministic toy tokenizer, and the filler text the simulated engine writes.

The simulated engine needs token ids only to decide what the prefix cache can
serve, so the tokenizer's duties are to be *stable* (the same text gives the
same ids in every process and on every run), *prefix-preserving* (a text that
extends another gives ids that extend the other's, up to the other's last,
possibly partial, token) and *fast* (agents re-send contexts of tens of
thousands of tokens with every request).

The rule: a text's UTF-8 bytes, cut into 4-byte chunks; a token's id is its chunk
read as a little-endian unsigned 32-bit integer, the last chunk zero-padded. So a
text of ``b`` bytes has ``ceil(b / 4)`` tokens, about what a BPE tokenizer gives
on English prose, and encoding is one :func:`struct.unpack` call. Ids are
non-negative; the chat template's special tokens (:mod:`concur.sim.server.prompt`)
are negative, so text can never forge them.

Filler text is made of 3-letter lowercase words joined by single spaces, so each
word with its following space is exactly one token and ``n`` words are exactly
``n`` tokens. Clients that want a prompt of a known token count (the swarm)
use :func:`filler_text`; the engine writes its outputs with :func:`output_text`.
"""

from __future__ import annotations

import random
import struct
import zlib

__all__ = [
    "BYTES_PER_TOKEN",
    "count_tokens",
    "encode",
    "filler_text",
    "output_text",
]

BYTES_PER_TOKEN = 4

_WORDS = (
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was",
    "one", "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old",
    "see", "two", "way", "who", "boy", "did", "its", "let", "put", "say", "she", "too", "use",
    "hit", "map", "key", "set", "run", "log", "fix", "bug", "end", "top", "low", "big", "few",
    "own", "try", "ask", "lot", "far", "bit", "job", "add", "sum", "max", "min", "row", "col",
    "tag", "api", "web", "app", "dev", "ops", "net", "cpu", "gpu", "ram", "keg", "bus", "box",
    "cup", "fan", "gap", "hub", "ink", "jam", "kit", "lab", "mix", "nap", "oak", "pen", "rag",
    "sip", "tab", "urn", "van", "wax", "yak", "zip",
)  # fmt: skip
"""Filler vocabulary: 3-letter ASCII words (with a space, one token each)."""

assert all(len(w) == BYTES_PER_TOKEN - 1 and w.isascii() and w.isalpha() for w in _WORDS)


def encode(text: str) -> tuple[int, ...]:
    """The token ids of ``text``."""
    data = text.encode()
    pad = -len(data) % BYTES_PER_TOKEN
    if pad:
        data += b"\0" * pad
    return struct.unpack(f"<{len(data) // BYTES_PER_TOKEN}I", data)


def count_tokens(text: str) -> int:
    """How many tokens ``text`` has."""
    n = len(text) if text.isascii() else len(text.encode())
    return -(-n // BYTES_PER_TOKEN)


def filler_text(num_tokens: int, seed: int | str = 0) -> str:
    """Text of exactly ``num_tokens`` tokens: seeded random words.

    Different seeds give different texts (two agents' contexts do not share a
    cache block by accident); the same seed gives the same text.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    rng = random.Random(seed if isinstance(seed, int) else zlib.crc32(seed.encode()))
    return " ".join(rng.choices(_WORDS, k=num_tokens))


def output_text(request_id: str, start: int, end: int, total: int) -> str:
    """Output tokens ``start`` (inclusive) to ``end`` (exclusive) of a request that
    writes ``total`` tokens in all.

    ``output_text(rid, 0, n, n)`` is exactly ``n`` tokens, and the pieces of any
    split of ``[0, n)`` concatenate to it (so a stream's deltas add up to the
    non-streamed text). The words depend on the request id.
    """
    if not 0 <= start <= end <= total:
        raise ValueError(f"need 0 <= start <= end <= total, got {start}, {end}, {total}")
    base = zlib.crc32(request_id.encode())
    n = len(_WORDS)
    words = [_WORDS[(base + 7 * i) % n] for i in range(start, end)]
    text = " ".join(words)
    if words and end < total:
        text += " "
    return text
