"""Prompts for the simulated engine: the chat template and cacheable outputs.

**Chat template.** Each message renders as ``<role> content <end>`` (one special
token each side), and the prompt ends with the generation prompt ``<assistant>``.
Rendering is a plain concatenation, so a conversation that re-sends its earlier
messages unchanged renders to a prompt that *extends* the previous one, and the
engine's prefix cache serves the shared part. Template overhead: 2 tokens per
message plus 1.

**Cacheable outputs.** The engine model names a request's output tokens
``output_segment(request_id, n)`` (a virtual segment), not by token ids, so an
assistant message tokenized from its text would never match the KV blocks the
engine cached while generating it. To line them up, the server records every
chat output it returned (:class:`OutputRegistry`: text digest -> request id,
output length, prompt length; bounded, least recently used dropped first), and
the template renders an assistant message whose content is a recorded output as
that virtual segment instead of its text's ids. Because the previous prompt ended
with ``<assistant>``, the next prompt then carries exactly the previous prompt,
its output, and new tokens after, as vLLM sees an agent's growing context: every
full block the engine computed hits if it was not evicted. An assistant message
the registry does not know (edited, or from another server) is tokenized as text
and its tokens are prefilled again.

The completions endpoint has no messages to recognise outputs in: its prompt
(text or token ids) is tokenized as is, so a client that appends a previous
completion's text to its next prompt recomputes that text.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from concur.sim.blocks import Segment, TokenSeq, output_segment
from concur.sim.server.tokenizer import encode

__all__ = [
    "END",
    "GENERATION_PROMPT",
    "ROLE_IDS",
    "BuiltPrompt",
    "Message",
    "OutputRegistry",
    "PromptBuilder",
    "RecordedOutput",
    "chat_overhead",
]

ROLE_IDS = {
    "system": -1,
    "developer": -1,
    "user": -2,
    "assistant": -3,
    "tool": -4,
    "function": -4,
}
"""Special token opening a message of each role (negative: text ids are >= 0)."""

END = -5
"""Special token closing a message."""

GENERATION_PROMPT = ROLE_IDS["assistant"]
"""The token a chat prompt ends with."""


def chat_overhead(num_messages: int) -> int:
    """Template tokens around ``num_messages`` messages (2 each, plus 1)."""
    return 2 * num_messages + 1


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message, reduced to what the template renders."""

    role: str
    content: str = ""
    extra: str = ""
    """Text rendered after the content (an assistant's tool calls, as JSON)."""


@dataclass(frozen=True, slots=True)
class RecordedOutput:
    """A chat output the server returned, as the engine cached it."""

    request_id: str
    num_tokens: int
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class BuiltPrompt:
    """A prompt ready for the engine."""

    tokens: TokenSeq
    known_prefix_tokens: int
    """Leading tokens this conversation had already computed (the last recognised
    output's request: its prompt plus output minus one); 0 when unknown."""
    reused_outputs: int
    """Assistant messages rendered as the engine's own output tokens."""

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class OutputRegistry:
    """Outputs the server returned, by content: text digest -> :class:`RecordedOutput`.

    Holds at most ``capacity`` entries; looking one up refreshes it.
    """

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 0:
            raise ValueError(f"OutputRegistry capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, RecordedOutput] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(text.encode(), digest_size=16).digest()

    def record(self, text: str, output: RecordedOutput) -> None:
        if not self.capacity or not text:
            return
        entries = self._entries
        key = self._key(text)
        entries[key] = output
        entries.move_to_end(key)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def find(self, text: str) -> RecordedOutput | None:
        if not self._entries or not text:
            return None
        key = self._key(text)
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found


class PromptBuilder:
    """Renders requests into engine prompts of ``block_size``-token blocks."""

    def __init__(self, block_size: int, registry: OutputRegistry | None = None) -> None:
        self.block_size = block_size
        self.registry = registry if registry is not None else OutputRegistry()

    def chat(self, messages: Sequence[Message]) -> BuiltPrompt:
        """The prompt of a conversation (see the module docstring)."""
        segments: list[Segment] = []
        run: list[int] = []
        done = 0  # tokens in ``segments``
        known = 0
        reused = 0
        find = self.registry.find
        for message in messages:
            run.append(ROLE_IDS[message.role])
            found = (
                find(message.content) if message.role == "assistant" and message.content else None
            )
            if found is not None:
                pos = done + len(run)
                segments.append(tuple(run))
                segments.append(output_segment(found.request_id, found.num_tokens))
                done = pos + found.num_tokens
                run = []
                reused += 1
                if pos == found.prompt_tokens:
                    known = max(known, pos + found.num_tokens - 1)
            elif message.content:
                run.extend(encode(message.content))
            if message.extra:
                run.extend(encode(message.extra))
            run.append(END)
        run.append(GENERATION_PROMPT)
        segments.append(tuple(run))
        return BuiltPrompt(TokenSeq(segments, self.block_size), known, reused)

    def text(self, text: str) -> BuiltPrompt:
        """A raw text prompt (completions)."""
        return self.ids(encode(text))

    def ids(self, ids: Sequence[int]) -> BuiltPrompt:
        """A prompt of explicit token ids (completions)."""
        return BuiltPrompt(TokenSeq([tuple(ids)], self.block_size), 0, 0)
