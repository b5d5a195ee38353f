"""llama.cpp adapter: ``llama-server``'s ``GET /slots`` (JSON) -> :class:`EngineSignal`.

``llama-server`` no longer exports KV usage on ``/metrics``; ``/slots`` has what
is needed. Checked against ``tools/server/server-context.cpp``
(``server_slot::to_json``) and ``tools/server/README.md`` in the llama.cpp tree
vendored by llama-cpp-python 0.3.36: the endpoint answers a JSON array with one
object per slot (``-np``), always with ``id``, ``n_ctx`` (the slot's context
size), ``speculative`` and ``is_processing``; a slot that has served a task also
has ``id_task``, ``n_prompt_tokens`` (the size of the slot's token cache: the
cached prefix, the processed prompt and every generated token, which is
appended as it is sampled), ``n_prompt_tokens_processed``,
``n_prompt_tokens_cache``, ``params`` and ``next_token``. Older servers had
``state`` (0 idle) instead of ``is_processing``; both are read. Started with
``--no-slots``, the server answers an ``{"error": {...}}`` object instead.

Mapping, following vLLM's meaning of usage (an idle slot's cached prompt is
reusable, not held): ``kv_usage`` = tokens of processing slots / sum of
``n_ctx``; ``running`` = processing slots; ``kv_capacity_tokens`` = sum of
``n_ctx``. ``waiting``, preemptions and prefix counters are not on ``/slots``
and read as None.

Caveat: with ``--kv-unified`` all slots share one pool and each reports the
whole pool as its ``n_ctx``, so the capacity is overstated by the slot count and
the usage understated by the same factor; ``/slots`` alone cannot tell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from concur.adapters.errors import AdapterError
from concur.adapters.signal import EngineSignal


@dataclass(frozen=True, slots=True)
class Slot:
    """What the adapter reads of one ``/slots`` entry."""

    n_ctx: int
    processing: bool
    tokens: int | None
    """Tokens held in the slot's cache (``n_prompt_tokens``); None when not reported."""


def parse(text: str, timestamp: float) -> EngineSignal:
    """Read a ``llama-server`` ``/slots`` answer into a signal.

    Raises :class:`~concur.adapters.errors.AdapterError` when the text is not
    JSON, is the server's error object, or is not a list of slots.
    """
    slots = parse_slots(text)
    capacity = sum(slot.n_ctx for slot in slots)
    busy = [slot for slot in slots if slot.processing]
    held = [slot.tokens for slot in busy]
    kv_usage: float | None = None
    if capacity > 0 and all(tokens is not None for tokens in held):
        kv_usage = sum(tokens for tokens in held if tokens is not None) / capacity
    return EngineSignal(
        timestamp=timestamp,
        kv_usage=kv_usage,
        running=len(busy),
        kv_capacity_tokens=capacity or None,
        engines=1,
    )


def parse_slots(text: str) -> list[Slot]:
    """The slots of a ``/slots`` answer, validated."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise AdapterError(
            f"the llama-server /slots answer is not JSON ({exc}); "
            "check that the URL points at a llama-server"
        ) from exc
    if isinstance(data, Mapping) and "error" in data:
        raise AdapterError(
            f"llama-server answered /slots with an error: {_error_message(data['error'])} "
            "(start it without --no-slots)"
        )
    if not isinstance(data, list):
        raise AdapterError(
            f"the llama-server /slots answer is a JSON {type(data).__name__}, expected a list "
            "of slots; check that the URL points at a llama-server"
        )
    return [_slot(index, entry) for index, entry in enumerate(data)]


def _slot(index: int, entry: object) -> Slot:
    if not isinstance(entry, Mapping):
        raise AdapterError(f"llama-server /slots entry {index} is not an object: {entry!r:.80}")
    n_ctx = _int_field(index, entry, "n_ctx")
    if n_ctx is None:
        raise AdapterError(f"llama-server /slots entry {index} has no n_ctx")
    if "is_processing" in entry:
        processing = entry["is_processing"]
        if not isinstance(processing, bool):
            raise AdapterError(
                f"llama-server /slots entry {index}: is_processing is {processing!r}, "
                "expected true or false"
            )
    elif entry.get("state") is not None:
        processing = _int_field(index, entry, "state") != 0
    else:
        raise AdapterError(f"llama-server /slots entry {index} has neither is_processing nor state")
    return Slot(
        n_ctx=n_ctx, processing=processing, tokens=_int_field(index, entry, "n_prompt_tokens")
    )


def _int_field(index: int, entry: Mapping[str, object], name: str) -> int | None:
    """A non-negative integer field; None when absent."""
    value = entry.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AdapterError(
            f"llama-server /slots entry {index}: {name} is {value!r}, expected a number"
        )
    if value < 0 or value != int(value):
        raise AdapterError(
            f"llama-server /slots entry {index}: {name} is {value!r}, "
            "expected a non-negative integer"
        )
    return int(value)


def _error_message(error: object) -> str:
    if isinstance(error, Mapping):
        message = error.get("message")
        code = error.get("code")
        if message is not None:
            return f"{message} (code {code})" if code is not None else str(message)
    return repr(error)
