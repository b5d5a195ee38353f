"""Reading a Prometheus text exposition the way the engine adapters need it.

Engines export one series per (model, data-parallel rank, process, ...) and the
adapters must fold them into one number per signal without being fooled by the
layout of the page. This module does the parsing and the folding once:

* samples are indexed by their *sample* name (``vllm:num_preemptions_total``,
  never a prefix match), so ``_created``, ``_bucket``, ``_sum`` and
  ``vllm:num_requests_waiting_by_reason`` never leak into
  ``vllm:num_requests_waiting``;
* labels are kept as a mapping, so their order on the page (single-process mode
  keeps declaration order, multiprocess mode sorts them) does not matter;
* NaN and infinite values are dropped: they read as "unknown", never as a number;
* with ``keep`` (the sample names an adapter reads), only those lines are parsed:
  an engine page is mostly histograms nobody here reads, and parsing runs on the
  proxy's event loop (a 40 kB vLLM page: 12 ms whole, 0.7 ms kept lines only);
* :func:`fold` groups series by the labels that identify an engine and combines
  duplicates within a group (the same value reported by several processes or
  ranks) separately from the combination across groups (sum counts, max usage).

Parsing goes through ``prometheus_client.parser.text_string_to_metric_families``;
anything it rejects becomes an :class:`~concur.adapters.errors.AdapterError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from prometheus_client.parser import text_string_to_metric_families

from concur.adapters.errors import AdapterError

Combine = Callable[[Sequence[float]], float]
"""How to fold several values into one (``max``, ``sum``, :func:`mean`)."""

LabelFilter = Callable[[Mapping[str, str]], bool]
"""Keeps a series when it returns True."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One series of a scrape: its labels and its value (never NaN)."""

    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class Exposition:
    """The samples of one scrape, indexed by sample name."""

    by_name: Mapping[str, tuple[Sample, ...]]

    def samples(self, name: str) -> tuple[Sample, ...]:
        """All series of the exact sample ``name`` (empty when the metric is absent)."""
        return self.by_name.get(name, ())

    def has_prefix(self, prefix: str) -> bool:
        """Whether any sample name starts with ``prefix`` (e.g. ``"vllm:"``)."""
        return any(name.startswith(prefix) for name in self.by_name)


def parse_exposition(text: str, *, source: str, keep: Collection[str] | None = None) -> Exposition:
    """Parse a Prometheus text page; ``source`` names the engine in error messages.

    With ``keep``, only the samples of those exact names are parsed; a page with
    none of them is parsed whole, so that a page that is not Prometheus text at all
    still says so.

    Raises:
        AdapterError: the text is not a Prometheus text exposition.
    """
    if keep:
        starts = tuple(name + end for name in keep for end in ("{", " "))
        # Lines end at "\n" only, as for the parser: str.splitlines would also split at
        # characters a label value may hold (U+2028, \x85, ...).
        kept = [line for line in text.split("\n") if line.startswith(starts)]
        if kept:
            text = "\n".join(kept) + "\n"
    collected: dict[str, list[Sample]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                value = float(sample.value)
                if not math.isfinite(value):
                    continue
                labels = MappingProxyType(dict(sample.labels))
                collected.setdefault(sample.name, []).append(Sample(labels, value))
    except Exception as exc:  # the parser raises ValueError, and others on odd input
        raise AdapterError(
            f"the {source} metrics page is not a Prometheus text exposition "
            f"({type(exc).__name__}: {exc}; it begins {_head(text)!r}); "
            f"check that the URL points at the {source} server's metrics endpoint"
        ) from exc
    return Exposition(MappingProxyType({k: tuple(v) for k, v in collected.items()}))


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (for rates, where neither sum nor max makes sense)."""
    return math.fsum(values) / len(values)


def group_key(labels: Mapping[str, str], group_by: Sequence[str]) -> tuple[str, ...]:
    """The values of ``group_by`` in ``labels``; an absent label reads as ``""``."""
    return tuple(labels.get(name, "") for name in group_by)


def groups(
    samples: Iterable[Sample],
    group_by: Sequence[str],
    where: LabelFilter | None = None,
) -> dict[tuple[str, ...], list[float]]:
    """Values of ``samples`` grouped by the labels in ``group_by``."""
    grouped: dict[tuple[str, ...], list[float]] = {}
    for sample in samples:
        if where is not None and not where(sample.labels):
            continue
        grouped.setdefault(group_key(sample.labels, group_by), []).append(sample.value)
    return grouped


def fold(
    samples: Iterable[Sample],
    *,
    group_by: Sequence[str],
    within: Combine,
    across: Combine,
    where: LabelFilter | None = None,
) -> float | None:
    """Fold series into one value, or None when there are none.

    Series with the same ``group_by`` labels describe the same engine (several
    processes or ranks reporting it) and are combined with ``within``; the
    per-engine values are then combined with ``across``.
    """
    grouped = groups(samples, group_by, where)
    if not grouped:
        return None
    return across([within(values) for values in grouped.values()])


def label_int(labels: Mapping[str, str], name: str) -> int | None:
    """A label read as a positive integer; None when absent, ``"None"`` or not a number."""
    raw = labels.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        return None
    return int(value)


def as_count(value: float | None) -> int | None:
    """A gauge that counts things (requests) as an int; negative values read as unknown."""
    if value is None or value < 0 or math.isinf(value):
        return None
    return round(value)


def _head(text: str, limit: int = 60) -> str:
    stripped = text.lstrip()
    first_line = stripped.splitlines()[0] if stripped else ""
    return first_line[:limit]
