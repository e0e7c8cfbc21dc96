"""Harmony prompt rendering and streaming parsing for GPT-OSS (through ``openai_harmony``)."""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
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
    RenderConversationConfig,
    Role,
    StreamableParser,
    StreamState,
    SystemContent,
    ToolDescription,
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
ToolChoice = str | Mapping[str, Any] | None

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def normalize_messages(messages: MessagesLike) -> list[dict[str, Any] | Message]:
    """Accept a prompt string, OpenAI-style dicts or Harmony ``Message`` objects.

    Assistant dicts may carry ``reasoning`` (or ``reasoning_content``) and OpenAI-style
    ``tool_calls``; tool dicts a ``tool_call_id`` and/or ``name``.
    """
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
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise ValueError(f"messages[{i}] ({role}) has no 'content'")
        if isinstance(content, list):  # OpenAI content parts: only text can be honoured
            content = _text_parts(content, i)
        if content is not None and not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a string")
        item = {**m, "content": content}
        if role == "assistant" and item.get("tool_calls") is not None:
            item["tool_calls"] = [_tool_call_dict(c, i) for c in item["tool_calls"]]
        out.append(item)
    return out


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"messages[{i}].content has a {kind!r} part; only text is supported")
        if not isinstance(part.get("text"), str):
            raise TypeError(f"messages[{i}].content text parts need a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _tool_call_dict(call: Any, i: int) -> dict[str, str]:
    """An OpenAI tool call (or a :class:`ToolCall`) as ``{id, name, arguments}``."""
    if isinstance(call, ToolCall):
        return {"id": call.id, "name": call.name, "arguments": call.arguments}
    if not isinstance(call, Mapping):
        raise TypeError(f"messages[{i}].tool_calls entries must be objects")
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"messages[{i}].tool_calls needs a function name")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": str(call.get("id") or ""), "name": name, "arguments": args}


def tool_descriptions(tools: Sequence[Any] | None) -> list[ToolDescription]:
    """Function tools from OpenAI-style ``{"type": "function", "function": {...}}`` dicts,
    flat ``{name, description, parameters}`` dicts or objects with those attributes."""
    out: list[ToolDescription] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if isinstance(tool, Mapping):
            if tool.get("type", "function") != "function":
                raise ValueError(f"tools[{i}] has type {tool.get('type')!r}; only 'function'")
            fn = tool.get("function", tool)
            if not isinstance(fn, Mapping):
                raise TypeError(f"tools[{i}].function must be an object")
            name, desc, params = fn.get("name"), fn.get("description"), fn.get("parameters")
        else:
            name = getattr(tool, "name", None)
            desc = getattr(tool, "description", None)
            params = getattr(tool, "parameters", None)
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise ValueError(f"tools[{i}] name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if name in seen:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        seen.add(name)
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"tools[{i}].parameters must be a JSON schema object")
        if desc is not None and not isinstance(desc, str):
            raise TypeError(f"tools[{i}].description must be a string")
        out.append(ToolDescription.new(name, desc or "", dict(params) if params else None))
    return out


def _choice_name(tool_choice: ToolChoice, names: set[str]) -> str | None:
    """The forced function's name, '' for 'required', None for 'auto' / 'none'."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not names:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return ""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return name
    raise ValueError("tool_choice must be 'auto', 'none', 'required' or {'function': {'name'}}")


def reply_primer(tool_choice: ToolChoice = None, tools: Sequence[Any] | None = None) -> list[int]:
    """Tokens that open the assistant's reply to force a tool call (empty when not forced).

    A named function gets the whole header up to ``<|message|>``; 'required' stops after
    ``to=functions.`` so the model picks which function.
    """
    names = {t.name for t in tool_descriptions(tools)}
    name = _choice_name(tool_choice, names)
    if name is None:
        return []
    header = "<|channel|>commentary to=functions."
    if name:
        header += f"{name} <|constrain|>json<|message|>"
    return list(load_encoding().encode(header, allowed_special="all"))


def _system_content(
    reasoning_effort: Effort,
    model_identity: str | None,
    knowledge_cutoff: str | None,
    conversation_start_date: str | None,
) -> SystemContent:
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
    return system


def build_conversation(
    messages: MessagesLike,
    *,
    reasoning_effort: Effort = "medium",
    model_identity: str | None = None,
    knowledge_cutoff: str | None = None,
    conversation_start_date: str | None = None,
    tools: Sequence[Any] | None = None,
    tool_choice: ToolChoice = None,
) -> Conversation:
    """Turn chat messages into a Harmony ``Conversation``.

    OpenAI-style ``system`` and ``developer`` messages become the developer instructions
    (Harmony's own system message carries identity, dates and reasoning effort); ``tools``
    are declared there as function tools (``tool_choice='none'`` leaves them out).
    Assistant reasoning of turns that ended before the last user message is dropped, as
    Harmony expects; reasoning of the current turn (tool calls pending) is kept.
    """
    system = _system_content(
        reasoning_effort, model_identity, knowledge_cutoff, conversation_start_date
    )
    described = tool_descriptions(tools)
    _choice_name(tool_choice, {t.name for t in described})  # validate before rendering
    items = normalize_messages(messages)
    instructions = [
        m["content"]
        for m in items
        if isinstance(m, dict) and m["role"] in ("system", "developer") and m["content"]
    ]
    out: list[Message] = [Message.from_role_and_content(Role.SYSTEM, system)]
    dev = DeveloperContent.new()
    if instructions:
        dev = dev.with_instructions("\n\n".join(instructions))
    if described and tool_choice != "none":
        dev = dev.with_function_tools(described)
    if instructions or (described and tool_choice != "none"):
        out.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    last_user = max(
        (i for i, m in enumerate(items) if isinstance(m, dict) and m["role"] == "user"),
        default=-1,
    )
    call_names: dict[str, str] = {}
    for i, m in enumerate(items):
        if isinstance(m, Message):
            out.append(m)
        elif m["role"] == "user":
            out.append(Message.from_role_and_content(Role.USER, m["content"]))
        elif m["role"] == "assistant":
            out.extend(_assistant_messages(m, keep_reasoning=i > last_user, names=call_names))
        elif m["role"] == "tool":
            name = m.get("name") or call_names.get(str(m.get("tool_call_id") or ""))
            if not name:
                raise ValueError(
                    f"messages[{i}] (tool) needs a 'name' or the 'tool_call_id' of an earlier call"
                )
            author_name = name if "." in name else f"functions.{name}"
            author = Author.new(Role.TOOL, author_name)
            msg = Message.from_author_and_content(author, m["content"])
            out.append(msg.with_channel("commentary").with_recipient("assistant"))
    return Conversation.from_messages(out)


def _assistant_messages(
    m: dict[str, Any], *, keep_reasoning: bool, names: dict[str, str]
) -> list[Message]:
    out = []
    reasoning = m.get("reasoning") or m.get("reasoning_content")
    if reasoning and keep_reasoning:
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis")
        )
    calls = m.get("tool_calls") or []
    if m.get("content"):
        # Text next to tool calls is a preamble on the commentary channel.
        channel = "commentary" if calls else "final"
        out.append(
            Message.from_role_and_content(Role.ASSISTANT, m["content"]).with_channel(channel)
        )
    for call in calls:
        names[call["id"]] = call["name"]
        msg = Message.from_role_and_content(Role.ASSISTANT, call["arguments"])
        out.append(
            msg.with_channel("commentary")
            .with_recipient(f"functions.{call['name']}")
            .with_content_type("<|constrain|>json")
        )
    return out


def render_prompt(messages: MessagesLike, **options: Any) -> list[int]:
    """Token ids of the conversation, ready for the assistant's next reply."""
    conv = build_conversation(messages, **options)
    config = RenderConversationConfig(auto_drop_analysis=False)  # done in build_conversation
    return list(load_encoding().render_conversation_for_completion(conv, Role.ASSISTANT, config))


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
        self._ids: list[str] = []

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

    def _call_id(self, i: int) -> str:
        # Ids must be unique across a conversation (clients key tool results by them).
        while len(self._ids) <= i:
            self._ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return self._ids[i]

    def tool_calls(self) -> list[ToolCall]:
        """Calls addressed to ``functions.*`` (Harmony's function-tool namespace)."""
        calls = []
        for i, m in enumerate(self.messages):
            if m.recipient and m.recipient.startswith("functions."):
                name = m.recipient.removeprefix("functions.")
                calls.append(ToolCall(self._call_id(i), name, "".join(m.text).strip()))
        return calls
