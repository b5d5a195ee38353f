"""Fault injection for reliability tests of whatever sits in front of the engine.

Set at start-up (``concur engine --fault-metrics MODE --fault-completions MODE``)
or at run time with ``POST /sim/faults`` and a JSON body
``{"metrics": MODE | null, "completions": MODE | null}`` (the body replaces the
whole fault set; ``{}`` clears it). ``GET /sim/faults`` shows the current set.

``metrics`` modes (``GET /metrics``):

- ``"500"``: answer 500;
- ``"garbage"``: answer 200 with text that is not a Prometheus exposition;
- ``"timeout"``: never answer (until the client gives up);
- ``"missing-kv"``: a normal page without ``vllm:kv_cache_usage_perc``.

``completions`` modes (``/v1/chat/completions`` and ``/v1/completions``; the
engine never sees the request):

- ``"500"``: answer 500 with an OpenAI error body;
- ``"reset"``: close the connection without an answer;
- ``"stall"``: a streaming request gets its headers and the first (role) chunk,
  then nothing; a non-streaming one gets nothing at all. Both hang until the
  client gives up.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

__all__ = ["COMPLETION_FAULTS", "METRICS_FAULTS", "CompletionsFault", "Faults", "MetricsFault"]

MetricsFault = Literal["500", "garbage", "timeout", "missing-kv"]
CompletionsFault = Literal["500", "reset", "stall"]
METRICS_FAULTS: tuple[str, ...] = get_args(MetricsFault)
COMPLETION_FAULTS: tuple[str, ...] = get_args(CompletionsFault)


@dataclass(frozen=True, slots=True)
class Faults:
    """The faults in force (``None``: behave normally)."""

    metrics: MetricsFault | None = None
    completions: CompletionsFault | None = None

    @classmethod
    def parse(cls, metrics: Any = None, completions: Any = None) -> Faults:
        """Faults from untrusted values; ValueError names the field and the choices."""
        if metrics is not None and metrics not in METRICS_FAULTS:
            raise ValueError(
                f"faults.metrics must be one of {', '.join(METRICS_FAULTS)} or null, "
                f"got {metrics!r}"
            )
        if completions is not None and completions not in COMPLETION_FAULTS:
            raise ValueError(
                f"faults.completions must be one of {', '.join(COMPLETION_FAULTS)} or null, "
                f"got {completions!r}"
            )
        return cls(metrics, completions)

    @classmethod
    def from_json(cls, body: Any) -> Faults:
        if not isinstance(body, Mapping):
            raise ValueError('the faults body must be a JSON object like {"metrics": "500"}')
        unknown = set(body) - {"metrics", "completions"}
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(sorted(unknown))}: "
                "use 'metrics' and 'completions'"
            )
        return cls.parse(body.get("metrics"), body.get("completions"))

    def to_json(self) -> dict[str, str | None]:
        return {"metrics": self.metrics, "completions": self.completions}
