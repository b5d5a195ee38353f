"""The engine-side priority's bytes: when a body may carry one, and how it is spliced."""

from __future__ import annotations

import json

import pytest

from concur._priority import enabled, may_stamp, stamp
from concur.config import Settings
from concur.proxy import ProxyOptions
from concur.runtime import proxy_options


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[]}',
        b'  \n{ "model" : "m" }\r\n',
        b"{}",
        b"{ }",
        '{"messages":[{"role":"user","content":"é"}]}'.encode(),
    ],
)
def test_stamp_puts_the_priority_first_and_keeps_every_other_byte(body: bytes) -> None:
    out = stamp(body, 7)
    assert json.loads(out) == {"priority": 7, **json.loads(body)}
    assert next(iter(json.loads(out))) == "priority"
    start = body.index(b"{")
    assert out.startswith(body[:start] + b'{"priority":7')
    assert out.endswith(body[start + 1 :])


@pytest.mark.parametrize(
    ("body", "parsed", "expected"),
    [
        (b'{"model":"m"}', None, True),
        (b'{"model":"m"}', {"model": "m"}, True),
        (b'{"model":"m","priority":-3}', None, False),
        (b'{"model":"m","priority":-3}', {"model": "m", "priority": -3}, False),
        # Only the top level counts once the body is parsed; unparsed, any mention keeps
        # the body as it is.
        (b'{"tools":[{"priority":1}]}', {"tools": [{"priority": 1}]}, True),
        (b'{"tools":[{"priority":1}]}', None, False),
        # Not an object: it goes as it came, for the engine to judge.
        (b"{not json", None, False),
        (b"[1, 2]", None, False),
        (b"", None, False),
        (b"  {}  \n", None, True),
    ],
)
def test_may_stamp(body: bytes, parsed: dict[str, object] | None, expected: bool) -> None:
    assert may_stamp(body, parsed) is expected


def test_auto_is_on_for_vllm_only() -> None:
    assert enabled("auto", "vllm")
    assert not enabled("auto", "sglang")
    assert not enabled("auto", "llamacpp")
    assert enabled("fewest-steps", "sglang")
    assert not enabled("off", "vllm")


@pytest.mark.parametrize(
    ("kind", "setting", "expected"),
    [("vllm", "auto", True), ("sglang", "auto", False), ("vllm", "off", False)],
)
def test_the_proxy_stamps_as_configured(kind: str, setting: str, expected: bool) -> None:
    settings = Settings(engine={"kind": kind}, admission={"engine_priority": setting})
    assert proxy_options(settings).engine_priority is expected
    # The proxy's own default is the config's.
    assert (
        ProxyOptions(upstream="http://x:1").engine_priority
        is proxy_options(Settings()).engine_priority
    )
