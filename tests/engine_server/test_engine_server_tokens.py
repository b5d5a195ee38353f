"""The tokenizer, the chat template and the output registry of ``concur engine``."""

from __future__ import annotations

import pytest

from concur.sim.blocks import VirtualSegment
from concur.sim.engine import EngineModel, EngineRequest
from concur.sim.engine_config import EngineSpec
from concur.sim.server.prompt import (
    END,
    GENERATION_PROMPT,
    Message,
    OutputRegistry,
    PromptBuilder,
    RecordedOutput,
    chat_overhead,
)
from concur.sim.server.tokenizer import count_tokens, encode, filler_text, output_text

BS = 16


def ids(prompt_tokens: object) -> list[object]:
    """A TokenSeq flattened: explicit ids, and (key, i) for virtual tokens."""
    out: list[object] = []
    for seg in prompt_tokens.segments:  # type: ignore[attr-defined]
        if isinstance(seg, VirtualSegment):
            out.extend((seg.key, i) for i in range(seg.length))
        else:
            out.extend(seg)
    return out


# ------------------------------------------------------------------ tokenizer


def test_encode_is_four_bytes_per_token_little_endian() -> None:
    assert encode("abcd") == (int.from_bytes(b"abcd", "little"),)
    assert encode("abcde") == (int.from_bytes(b"abcd", "little"), ord("e"))
    assert encode("") == ()
    assert len(encode("naïve café")) == 3  # 12 UTF-8 bytes


@pytest.mark.parametrize("text", ["", "a", "abcd", "hello world!", "naïve café 日本語", "x" * 1001])
def test_count_matches_encode(text: str) -> None:
    assert count_tokens(text) == len(encode(text))


def test_extending_a_text_keeps_its_full_tokens() -> None:
    a = filler_text(50, seed=1) + " and a tail"
    b = a + " then more words"
    full = len(a.encode()) // 4
    assert encode(b)[:full] == encode(a)[:full]
    assert encode(b) == encode(b)  # stable


@pytest.mark.parametrize("n", [0, 1, 2, 17, 500])
def test_filler_text_has_exactly_n_tokens(n: int) -> None:
    assert count_tokens(filler_text(n, seed=n)) == n


def test_filler_text_depends_on_the_seed_only() -> None:
    assert filler_text(64, seed="agent-1") == filler_text(64, seed="agent-1")
    assert filler_text(64, seed="agent-1") != filler_text(64, seed="agent-2")
    with pytest.raises(ValueError, match="num_tokens"):
        filler_text(-1)


def test_output_text_pieces_add_up_to_n_tokens() -> None:
    whole = output_text("req-1", 0, 10, 10)
    assert count_tokens(whole) == 10
    pieces = [output_text("req-1", a, b, 10) for a, b in ((0, 1), (1, 4), (4, 4), (4, 10))]
    assert "".join(pieces) == whole
    assert not whole.startswith(" ") and not whole.endswith(" ")
    assert output_text("req-2", 0, 10, 10) != whole
    with pytest.raises(ValueError):
        output_text("req-1", 3, 2, 10)


# ------------------------------------------------------------------ template


def test_chat_template_tokens() -> None:
    builder = PromptBuilder(BS)
    messages = [Message("system", "abcdefgh"), Message("user", "hi")]
    built = builder.chat(messages)
    assert built.num_tokens == chat_overhead(2) + 2 + 1
    flat = ids(built.tokens)
    assert flat[0] == -1 and flat[3] == END and flat[4] == -2 and flat[-1] == GENERATION_PROMPT
    assert built.known_prefix_tokens == 0 and built.reused_outputs == 0


def test_a_longer_conversation_extends_the_shorter_prompt() -> None:
    builder = PromptBuilder(BS)
    first = [Message("system", filler_text(40, seed=1)), Message("user", filler_text(9, seed=2))]
    second = [*first, Message("assistant", "some answer"), Message("user", "more")]
    a, b = ids(builder.chat(first).tokens), ids(builder.chat(second).tokens)
    assert b[: len(a)] == a


def test_tool_calls_are_rendered_after_the_content() -> None:
    builder = PromptBuilder(BS)
    plain = builder.chat([Message("assistant", "x")])
    with_calls = builder.chat([Message("assistant", "x", extra='{"name":"ls"}')])
    assert with_calls.num_tokens == plain.num_tokens + count_tokens('{"name":"ls"}')


# ------------------------------------------------------------------ registry


def test_registry_is_bounded_and_least_recently_used_goes_first() -> None:
    reg = OutputRegistry(capacity=2)
    reg.record("a", RecordedOutput("r1", 1, 5))
    reg.record("b", RecordedOutput("r2", 1, 5))
    assert reg.find("a") == RecordedOutput("r1", 1, 5)  # refreshes "a"
    reg.record("c", RecordedOutput("r3", 1, 5))
    assert len(reg) == 2
    assert reg.find("b") is None
    assert reg.find("a") is not None and reg.find("c") is not None
    assert reg.find("") is None
    off = OutputRegistry(capacity=0)
    off.record("a", RecordedOutput("r1", 1, 5))
    assert off.find("a") is None


def _run(engine: EngineModel, req: EngineRequest) -> int:
    """Run one request to completion; its kv_tokens."""
    engine.add_request(req, 0.0)
    t = 0.0
    while engine.has_work():
        res = engine.step(t)
        t = res.end
        for fin in res.finished:
            return fin.kv_tokens
    raise AssertionError("the request did not finish")


def test_a_returned_output_hits_the_blocks_the_engine_cached() -> None:
    """The engine names outputs by request id; the template must line them up."""
    engine = EngineModel(EngineSpec(model="llama-3-8b", tp=1, kv_capacity_tokens=8192).build())
    builder = PromptBuilder(BS)
    convo = [Message("system", filler_text(100, seed=1)), Message("user", filler_text(37, 2))]
    first = builder.chat(convo)
    n = 45
    kv = _run(engine, EngineRequest("chatcmpl-1", first.tokens, n))
    assert kv == first.num_tokens + n - 1
    text = output_text("chatcmpl-1", 0, n, n)
    builder.registry.record(text, RecordedOutput("chatcmpl-1", n, first.num_tokens))

    nxt = [*convo, Message("assistant", text), Message("user", filler_text(30, seed=3))]
    second = builder.chat(nxt)
    assert second.reused_outputs == 1
    assert second.known_prefix_tokens == kv
    # previous prompt (ending <assistant>), the output, <end>, <user> 30 <end>, <assistant>
    assert second.num_tokens == first.num_tokens + n + 1 + 32 + 1
    assert engine.cached_prefix_tokens(second.tokens) == kv // BS * BS

    # The same conversation from a server that does not know the output: only the
    # blocks before the output hit, the output is prefilled again.
    stranger = PromptBuilder(BS).chat(nxt)
    assert stranger.reused_outputs == 0 and stranger.known_prefix_tokens == 0
    assert stranger.num_tokens == second.num_tokens
    assert engine.cached_prefix_tokens(stranger.tokens) == first.num_tokens // BS * BS


def test_completion_prompts_are_plain_tokens() -> None:
    builder = PromptBuilder(BS)
    assert builder.text("abcdefgh").num_tokens == 2
    built = builder.ids([5, 6, 7])
    assert ids(built.tokens) == [5, 6, 7] and built.known_prefix_tokens == 0
