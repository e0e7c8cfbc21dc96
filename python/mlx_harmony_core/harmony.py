"""Harmony prompt rendering and streaming parsing for GPT-OSS (through ``openai_harmony``)."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyEncodingName,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    load_harmony_encoding,
)

logger = logging.getLogger(__name__)

# Special tokens of the o200k_harmony encoding.
START = 200006
END = 200007
MESSAGE = 200008
RETURN = 200002
CALL = 200012
# Harmony's reply-ending tokens: <|return|> (done) and <|call|> (a tool call).
STOP_TOKENS = (RETURN, CALL)

Effort = Literal["low", "medium", "high"]
_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


@functools.lru_cache(maxsize=1)
def load_encoding() -> HarmonyEncoding:
    """The GPT-OSS Harmony encoding, loaded once (offline, from the shipped vocabulary)."""
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


MessagesLike = str | Sequence[Mapping[str, Any] | Message]


def normalize_messages(messages: MessagesLike) -> list[dict[str, Any] | Message]:
    """Accept a prompt string, OpenAI-style dicts or Harmony ``Message`` objects."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or isinstance(messages, bytes):
        raise TypeError("messages must be a string or a list of {'role', 'content'} dicts")
    out: list[dict[str, Any] | Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"messages[{i}] has role {role!r}; expected one of {sorted(_ROLES)}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        if content is not None and not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a string")
        out.append(dict(m))
    return out


def build_conversation(
    messages: MessagesLike,
    *,
    reasoning_effort: Effort = "medium",
    model_identity: str | None = None,
    knowledge_cutoff: str | None = None,
    conversation_start_date: str | None = None,
) -> Conversation:
    """Turn chat messages into a Harmony ``Conversation``.

    OpenAI-style ``system`` and ``developer`` messages become the developer instructions
    (Harmony's own system message carries identity, dates and reasoning effort). Earlier
    assistant turns keep only their final answer; their reasoning is dropped as Harmony
    expects after a final message.
    """
    if reasoning_effort not in _EFFORTS:
        raise ValueError(
            f"reasoning_effort must be one of {sorted(_EFFORTS)}, got {reasoning_effort!r}"
        )
    system = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    if model_identity:
        system = system.with_model_identity(model_identity)
    if knowledge_cutoff:
        system = system.with_knowledge_cutoff(knowledge_cutoff)
    if conversation_start_date:
        system = system.with_conversation_start_date(conversation_start_date)

    items = normalize_messages(messages)
    instructions = [
        m["content"] for m in items if isinstance(m, dict) and m["role"] in ("system", "developer")
    ]
    out: list[Message] = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions:
        dev = DeveloperContent.new().with_instructions("\n\n".join(instructions))
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    for m in items:
        if isinstance(m, Message):
            out.append(m)
        elif m["role"] == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif m["role"] == "assistant" and m.get("content"):
            out.append(
                Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel("final")
            )
        elif m["role"] == "tool":
            name = m.get("name") or "tool"
            author_name = name if "." in name else f"functions.{name}"
            author = Author.new(Role.TOOL, author_name)
            msg = Message.from_author_and_content(author, m["content"])
            out.append(msg.with_channel("commentary").with_recipient("assistant"))
    return Conversation.from_messages(out)


def render_prompt(messages: MessagesLike, **options: Any) -> list[int]:
    """Token ids of the conversation, ready for the assistant's next reply."""
    conv = build_conversation(messages, **options)
    return list(load_encoding().render_conversation_for_completion(conv, Role.ASSISTANT))


@dataclass
class ToolCall:
    """A function call the model asked for."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as JSON (raises ``ValueError`` if the model wrote invalid JSON)."""
        return json.loads(self.arguments)


@dataclass
class Delta:
    """A piece of text on one channel, as it is decoded."""

    channel: str
    text: str
    recipient: str | None = None


@dataclass
class _Parsed:
    channel: str
    recipient: str | None
    text: list[str] = field(default_factory=list)


class HarmonyStream:
    """Incremental, non-strict parser of an assistant reply in Harmony format.

    Wraps ``StreamableParser``. Tokens that do not form a Harmony message (a random-weight
    model's output, a malformed header, a parser error) are decoded as plain text on the
    ``final`` channel, so nothing raises and nothing is lost.
    """

    def __init__(self, encoding: HarmonyEncoding | None = None, *, max_header_tokens: int = 48):
        self.encoding = encoding or load_encoding()
        self._parser: StreamableParser | None = StreamableParser(self.encoding, Role.ASSISTANT)
        self._max_header = max_header_tokens
        self._header: list[int] = []
        self._detok: Any = None  # made on first use: the fallback is rare
        self.messages: list[_Parsed] = []

    @property
    def raw(self) -> bool:
        """True once the reply stopped looking like Harmony."""
        return self._parser is None

    def push(self, token: int) -> list[Delta]:
        """Feed one token; return the text it completes."""
        if self._parser is None:
            return self._raw_push([token])
        parser = self._parser
        try:
            parser.process(token)
        except HarmonyError as exc:
            logger.debug("harmony parse error at token %d: %s; switching to plain text", token, exc)
            return self._to_raw([token])
        state = parser.state
        if state == StreamState.HEADER:
            self._header.append(token)
            if len(self._header) > self._max_header:
                return self._to_raw([])
            return []
        if state == StreamState.CONTENT:
            if self._header:
                self._header = []
                self.messages.append(
                    _Parsed(parser.current_channel or "final", parser.current_recipient)
                )
            delta = parser.last_content_delta
            if delta:
                msg = self.messages[-1]
                msg.text.append(delta)
                return [Delta(msg.channel, delta, msg.recipient)]
            return []
        self._header = []  # EXPECT_START: a message ended
        return []

    def finish(self) -> list[Delta]:
        """End of generation: flush held text (an unfinished header becomes plain text)."""
        if self._parser is None:
            return self._raw_flush()
        if self._header:
            return self._to_raw([]) + self._raw_flush()
        return []

    def _to_raw(self, extra: list[int]) -> list[Delta]:
        tokens = [t for t in self._header if t not in (START,)] + extra
        self._parser = None
        self._header = []
        self.messages.append(_Parsed("final", None))
        return self._raw_push(tokens)

    def _raw_push(self, tokens: Iterable[int]) -> list[Delta]:
        if self._detok is None:
            from .stopping import harmony_detokenizer

            self._detok = harmony_detokenizer()
        enc = self.encoding
        text = "".join(self._detok.push(t) for t in tokens if not enc.is_special_token(t))
        return self._emit_raw(text)

    def _raw_flush(self) -> list[Delta]:
        return self._emit_raw(self._detok.flush()) if self._detok is not None else []

    def _emit_raw(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.messages[-1].text.append(text)
        return [Delta("final", text)]

    def text(self, channel: str) -> str:
        """All text parsed so far on ``channel`` (tool calls excluded)."""
        return "".join(
            "".join(m.text) for m in self.messages if m.channel == channel and not m.recipient
        )

    def tool_calls(self) -> list[ToolCall]:
        """Calls addressed to ``functions.*`` (Harmony's function-tool namespace)."""
        calls = []
        for i, m in enumerate(self.messages):
            if m.recipient and m.recipient.startswith("functions."):
                calls.append(
                    ToolCall(
                        f"call_{i}", m.recipient.removeprefix("functions."), "".join(m.text).strip()
                    )
                )
        return calls
