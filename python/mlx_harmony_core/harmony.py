"""Harmony prompt rendering and streaming parsing for GPT-OSS (through ``openai_harmony``)."""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Sequence
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

from ._vocab import VOCAB_NAME, ensure_vocab_env
from .chat_format import (
    ANSWER,
    REASONING,
    TOOL_CALL,
    ChatFormat,
    Delta,
    ReplyParser,
    TextParser,
)
from .errors import InvalidRequestError
from .messages import (
    MessagesLike,
    ToolCall,
    ToolChoice,
    choice_name,
    normalize_messages,
    tool_specs,
)
from .stopping import Detokenizer, byte_level_alphabet

logger = logging.getLogger(__name__)

# Special tokens of the o200k_harmony encoding.
START = 200006
END = 200007
MESSAGE = 200008
CHANNEL = 200005
RETURN = 200002
CALL = 200012
FIRST_SPECIAL = 199998  # o200k's ordinary tokens end here; the rest are control tokens
# Harmony's reply-ending tokens: <|return|> (done) and <|call|> (a tool call).
STOP_TOKENS = (RETURN, CALL)
VOCAB_SIZE = 201088  # o200k_harmony, as in the released GPT-OSS checkpoints

Effort = Literal["low", "medium", "high"]
_EFFORTS = {
    "low": ReasoningEffort.LOW,
    "medium": ReasoningEffort.MEDIUM,
    "high": ReasoningEffort.HIGH,
}


@functools.lru_cache(maxsize=1)
def load_encoding() -> HarmonyEncoding:
    """The GPT-OSS Harmony encoding, loaded once (offline, from the shipped vocabulary,
    unpacked on this first use)."""
    ensure_vocab_env()
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def tool_descriptions(tools: Sequence[Any] | None) -> list[ToolDescription]:
    """Validated function tools (see :func:`~mlx_harmony_core.messages.tool_specs`) as
    Harmony tool descriptions."""
    return [ToolDescription.new(t.name, t.description, t.parameters) for t in tool_specs(tools)]


def reply_primer(tool_choice: ToolChoice = None, tools: Sequence[Any] | None = None) -> list[int]:
    """Tokens that open the assistant's reply to force a tool call (empty when not forced).

    A named function gets the whole header up to ``<|message|>``; 'required' stops after
    ``to=functions.`` so the model picks which function.
    """
    names = {t.name for t in tool_descriptions(tools)}
    name = choice_name(tool_choice, names)
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
        raise InvalidRequestError(
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
    system_tools: Callable[[SystemContent], SystemContent] | None = None,
) -> Conversation:
    """Turn chat messages into a Harmony ``Conversation``.

    ``system_tools`` declares built-in tools (``python``, ``browser``) in the system message:
    it takes the system content and returns it with the tools added (see
    :meth:`~mlx_harmony_core.tools.builtin.BuiltinTools.system_content`).

    OpenAI-style ``system`` and ``developer`` messages become the developer instructions
    (Harmony's own system message carries identity, dates and reasoning effort); ``tools``
    are declared there as function tools (``tool_choice='none'`` leaves them out).
    Assistant reasoning of turns that ended before the last user message is dropped, as
    Harmony expects; reasoning of the current turn (tool calls pending) is kept.
    """
    system = _system_content(
        reasoning_effort, model_identity, knowledge_cutoff, conversation_start_date
    )
    if system_tools is not None:
        system = system_tools(system)
    described = tool_descriptions(tools)
    choice_name(tool_choice, {t.name for t in described})  # validate before rendering
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
                raise InvalidRequestError(
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
        # The tokens the last push/finish made text of: (offset back, kind) (see ReplyParser).
        self.claimed: list[tuple[int, str]] = []

    @property
    def raw(self) -> bool:
        """True once the reply stopped looking like Harmony."""
        return self._parser is None

    def push(self, token: int) -> list[Delta]:
        """Feed one token; return the text it completes."""
        self.claimed = []
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
            if self._header:  # this token (<|message|>) ended the header
                self._header = []
                self.messages.append(
                    _Parsed(parser.current_channel or "final", parser.current_recipient)
                )
                return []
            msg = self.messages[-1]
            kind = _kind(msg.channel, msg.recipient)
            self.claimed = [(0, kind)]
            delta = parser.last_content_delta
            if delta:
                msg.text.append(delta)
                call_id = None
                if msg.recipient and msg.recipient.startswith("functions."):
                    call_id = self._call_id(len(self.messages) - 1)
                return [Delta(msg.channel, delta, msg.recipient, kind, call_id)]
            return []
        self._header = []  # EXPECT_START: a message ended
        return []

    def finish(self) -> list[Delta]:
        """End of generation: flush held text (an unfinished header becomes plain text)."""
        self.claimed = []
        if self._parser is None:
            return self._raw_flush()
        if self._header:
            return self._to_raw([]) + self._raw_flush()
        return []

    def _to_raw(self, extra: list[int]) -> list[Delta]:
        # The header's tokens (the last pushed before ``extra``) become plain text.
        tokens = self._header + extra
        self._parser = None
        self._header = []
        self.messages.append(_Parsed("final", None))
        return self._raw_push(tokens)

    def _raw_push(self, tokens: list[int]) -> list[Delta]:
        if self._detok is None:
            self._detok = harmony_detokenizer()
        enc = self.encoding
        texts = []
        for off, t in enumerate(reversed(tokens)):
            if not enc.is_special_token(t):
                self.claimed.append((off, ANSWER))
        self.claimed.reverse()
        for t in tokens:
            if not enc.is_special_token(t):
                texts.append(self._detok.push(t))
        return self._emit_raw("".join(texts))

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

    def last_call(self) -> tuple[str, str, str] | None:
        """The last message's ``(recipient, channel, text)`` when it is addressed to a tool
        outside ``functions.*`` (a built-in tool: ``python``, ``browser.search``...); else
        ``None``. A reply that ended at ``<|call|>`` calls it."""
        if self._parser is None or not self.messages:
            return None
        m = self.messages[-1]
        if not m.recipient or m.recipient.startswith("functions.") or m.recipient == "assistant":
            return None
        return m.recipient, m.channel, "".join(m.text)

    def tool_calls(self) -> list[ToolCall]:
        """Calls addressed to ``functions.*`` (Harmony's function-tool namespace)."""
        calls = []
        for i, m in enumerate(self.messages):
            if m.recipient and m.recipient.startswith("functions."):
                name = m.recipient.removeprefix("functions.")
                calls.append(ToolCall(self._call_id(i), name, "".join(m.text).strip()))
        return calls


def _kind(channel: str, recipient: str | None) -> str:
    """Harmony's channels as the neutral kinds: analysis is reasoning, a message to a
    recipient is a tool call, final and commentary (preambles) are the answer."""
    if recipient:
        return TOOL_CALL
    return REASONING if channel == "analysis" else ANSWER


# -- GPT-OSS token tables ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def o200k_harmony_bytes() -> tuple[bytes, ...]:
    """Token bytes of GPT-OSS's o200k_harmony: the .tiktoken ranks plus Harmony's specials."""
    enc = load_encoding()
    path = os.path.join(os.environ["TIKTOKEN_ENCODINGS_BASE"], VOCAB_NAME)
    table: list[bytes] = []
    with open(path, "rb") as f:
        for rank, line in enumerate(f):
            token, r = line.split()
            if int(r) != rank:
                raise ValueError(f"{path} is not a rank-ordered .tiktoken file (line {rank})")
            table.append(base64.b64decode(token))
    for token in range(len(table), VOCAB_SIZE):
        table.append(enc.decode([token]).encode("utf-8"))
    return tuple(table)


# o200k's pre-tokenizer pattern (tiktoken's o200k_base), for the Hugging Face tokenizer.
_O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    return {b: c for c, b in byte_level_alphabet().items()}


def hf_tokenizer() -> Any:
    """o200k_harmony as a Hugging Face ``tokenizers.Tokenizer`` (byte-level BPE with every
    split of each token as a merge, ranked by the token: tiktoken's own tokenization),
    with Harmony's special tokens. What real GPT-OSS directories ship as tokenizer.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    table = o200k_harmony_bytes()
    chars = _byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    ranks = {table[i]: i for i in range(FIRST_SPECIAL)}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = ranks.get(token[:k]), ranks.get(token[k:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, text(token[:k]), text(token[k:])))
    merges.sort()
    bpe = models.BPE(
        vocab={text(t): i for t, i in ranks.items()},
        merges=[(m[3], m[4]) for m in merges],
        ignore_merges=True,  # a whole pre-token in the vocabulary is one token, as in tiktoken
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_O200K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(table[i].decode(), special=True, normalized=False)
            for i in range(FIRST_SPECIAL, VOCAB_SIZE)
        ]
    )
    return tok


@functools.lru_cache(maxsize=1)
def _harmony_prototype() -> Detokenizer:
    return Detokenizer(list(o200k_harmony_bytes()))


def harmony_detokenizer() -> Detokenizer:
    """A fresh detokenizer for GPT-OSS's vocabulary (the table is built once and shared)."""
    return _harmony_prototype().fresh()


# A reply under a constraint: free messages (reasoning, preambles), then the final answer or a
# call, each header spelled as GPT-OSS writes it (the recipient before or after the channel).
_REPLY_GRAMMAR = """
start: free* last
free: <|channel|> ("analysis" | "commentary") <|message|> TEXT <|end|> <|start|> "assistant"
last: {last}
final: <|channel|> "final" <|message|> {answer} <|return|>
{calls}
TEXT: /(.|\\n)*/
"""


def reply_grammar(answer: dict[str, Any] | None, tools: dict[str, dict[str, Any] | None]) -> str:
    """The llguidance grammar of a Harmony reply: reasoning free, the final answer
    ``answer`` (a grammar part; ``None``: free text), calls to ``tools`` with their
    arguments (``None``: free)."""
    from .structured import grammar_json

    parts: list[dict[str, Any]] = []
    rules = []
    last = ["final"]
    if answer is not None:
        parts.append({**answer, "name": "answer"})
    for i, (name, args) in enumerate(tools.items()):
        body = "TEXT"
        if args is not None:
            parts.append({**args, "name": f"tool_{i}"})
            body = f"@tool_{i}"
        recipient = json.dumps(f"to=functions.{name}")
        rules.append(
            f'call_{i}: (<|channel|> "commentary " {recipient} | " " {recipient} '
            f'<|channel|> "commentary") (" " <|constrain|> "json")? <|message|> {body} <|call|>'
        )
        last.append(f"call_{i}")
    lark = _REPLY_GRAMMAR.format(
        last=" | ".join(last),
        answer="@answer" if answer is not None else "TEXT",
        calls="\n".join(rules),
    )
    return grammar_json([{"lark_grammar": lark}, *parts])


@functools.lru_cache(maxsize=1)
def _header_words() -> tuple[tuple[int, ...], tuple[int, ...]]:
    enc = load_encoding()
    return tuple(enc.encode("final", allowed_special="all")), tuple(
        enc.encode("assistant", allowed_special="all")
    )


class ReasoningBudget:
    """Ends GPT-OSS's reasoning after ``limit`` tokens of analysis: the analysis message is
    closed and the final one opened (``<|end|><|start|>assistant<|channel|>final
    <|message|>``) as if the model had written it; with ``limit`` 0 the reply opens on the
    final channel. :meth:`forced` is the token that must come next (``None``: free)."""

    def __init__(self, limit: int, primer: Sequence[int] = ()) -> None:
        enc = load_encoding()
        final, assistant = _header_words()
        self.limit = limit
        self.spent = 0
        self._decode = enc.decode
        self._header: list[int] = []
        self._in_header = True
        self._analysis = False
        self._started = False  # a token of this reply was seen (the first header has begun)
        self._queue: deque[int] = deque()
        self._open_final = [CHANNEL, *final, MESSAGE]
        self._reopen = [START, *assistant]
        for token in primer:
            self.push(token)

    def push(self, token: int) -> None:
        if self._queue:
            if token == self._queue[0]:
                self._queue.popleft()
            else:
                self._queue.clear()
        self._started = True
        if self._in_header:
            if token == MESSAGE:
                self._in_header = False
                self._analysis = self._channel() == "analysis"
                self._header = []
            else:
                self._header.append(token)
        elif token == END:
            self._in_header, self._analysis = True, False
        elif token in STOP_TOKENS:
            self._in_header, self._analysis = False, False
        elif self._analysis:
            self.spent += 1

    def _channel(self) -> str:
        if CHANNEL not in self._header:
            return ""
        rest = self._header[self._header.index(CHANNEL) + 1 :]
        words = self._decode([t for t in rest if t < FIRST_SPECIAL]).split()
        return words[0] if words else ""

    def forced(self) -> int | None:
        if not self._queue and self.spent >= self.limit:
            if not self._in_header and self._analysis:
                self._queue.extend([END, *self._reopen, *self._open_final])
            elif self._in_header and not self._header:  # between messages
                self._queue.extend(
                    [*self._reopen, *self._open_final] if self._started else self._open_final
                )
        return self._queue[0] if self._queue else None


class HarmonyFormat(ChatFormat):
    """GPT-OSS: Harmony prompts (``openai_harmony``), ``<|return|>`` / ``<|call|>`` stops,
    replies parsed into analysis (reasoning), final and commentary (answer) and tool calls."""

    name = "harmony"

    def __init__(self, encoding: HarmonyEncoding | None = None) -> None:
        self.encoding = encoding or load_encoding()

    def render(
        self,
        messages: MessagesLike,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: ToolChoice = None,
        **options: Any,
    ) -> list[int]:
        return render_prompt(messages, tools=tools, tool_choice=tool_choice, **options)

    def primer(
        self, tool_choice: ToolChoice = None, tools: Sequence[Any] | None = None
    ) -> list[int]:
        return reply_primer(tool_choice, tools)

    def stop_ids(self) -> list[int]:
        return list(STOP_TOKENS)

    def finish_reason(self, token: int) -> str:
        return "tool_calls" if token == CALL else "stop"

    def token_bytes(self) -> Sequence[bytes]:
        return o200k_harmony_bytes()

    def encode(self, text: str) -> list[int]:
        return list(self.encoding.encode(text, allowed_special="all"))

    def encode_text(self, text: str) -> list[int]:
        return list(self.encoding.encode(text, disallowed_special=()))

    def special_ids(self) -> Sequence[int]:
        return range(FIRST_SPECIAL, VOCAB_SIZE)

    def reply_grammar(
        self, answer: dict[str, Any] | None, tools: dict[str, dict[str, Any] | None]
    ) -> str:
        return reply_grammar(answer, tools)

    def reasoning_budget(self, limit: int, primer: Sequence[int] = ()) -> ReasoningBudget:
        return ReasoningBudget(limit, primer)

    def detokenizer(self) -> Detokenizer:
        return harmony_detokenizer()  # one table for the process, shared by every parser

    def parser(self, primer: Sequence[int] = (), *, raw: bool = False) -> ReplyParser:
        if raw:
            return TextParser(self.detokenizer())
        stream = HarmonyStream(self.encoding)
        for token in primer:
            stream.push(token)
        return stream

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE
