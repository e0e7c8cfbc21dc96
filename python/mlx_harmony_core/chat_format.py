"""The chat-format seam: everything a model family's prompt and reply format decides.

``load()`` picks one format per model: :class:`~mlx_harmony_core.harmony.HarmonyFormat`
(GPT-OSS) or :class:`ChatTemplateFormat` (every other mlx-lm model, through its tokenizer's
chat template). The engine, the server and the chat only see this interface and the neutral
kinds of text it yields: ``reasoning``, ``answer`` and ``tool_call``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .messages import MessagesLike, ToolCall, ToolChoice, normalize_messages, tool_specs
from .options import RENDER, fields_in
from .stopping import Detokenizer, tokenizer_bytes

logger = logging.getLogger(__name__)

# What a caller may ask of any format's render(); a format ignores what it has no use for
# (their schema: options.RequestOptions).
RENDER_OPTIONS = fields_in(RENDER)

REASONING = "reasoning"
ANSWER = "answer"
TOOL_CALL = "tool_call"


@dataclass
class Delta:
    """A piece of reply text as it is decoded: its neutral ``kind``, and the format's own
    ``channel`` name and ``recipient`` (a tool call's target)."""

    channel: str
    text: str
    recipient: str | None = None
    kind: str = ANSWER
    call_id: str | None = None  # a tool call's id (the same as in ``tool_calls()``)


class ReplyParser(Protocol):
    """Turns reply tokens into deltas, one token at a time.

    A parser may also set ``claimed`` after each :meth:`push` / :meth:`finish`: the tokens
    that became text of a kind with this call, as ``(offset, kind)`` pairs (``offset`` 0 is
    the token just pushed, 1 the one before, ...; a token of an incomplete UTF-8 character
    is claimed when pushed). Control tokens and headers are never claimed. The request maps
    token logprobs onto the answer's text and counts reasoning tokens with it.
    """

    def push(self, token: int) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...

    def tool_calls(self) -> list[ToolCall]: ...


class ChatFormat(ABC):
    """How one model family renders a chat and reads its reply."""

    name: str = ""

    @abstractmethod
    def render(
        self,
        messages: MessagesLike,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: ToolChoice = None,
        **options: Any,
    ) -> list[int]:
        """Prompt token ids, ready for the assistant's reply."""

    def primer(
        self, tool_choice: ToolChoice = None, tools: Sequence[Any] | None = None
    ) -> list[int]:
        """Tokens that open the reply (a forced tool call); empty by default."""
        return []

    @abstractmethod
    def stop_ids(self) -> list[int]:
        """The model's own reply-ending token ids."""

    def finish_reason(self, token: int) -> str:
        """Why a reply that ended on stop token ``token`` ended."""
        return "stop"

    @abstractmethod
    def token_bytes(self) -> Sequence[bytes]:
        """The bytes of every token id (special tokens as their text)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of raw text."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of text inside a reply (no start-of-text token, no special tokens)."""
        return self.encode(text)

    def special_ids(self) -> Sequence[int]:
        """Ids of control tokens (never part of text: a grammar cannot spell them)."""
        return []

    def reply_grammar(
        self, answer: dict[str, Any] | None, tools: dict[str, dict[str, Any] | None]
    ) -> str | None:
        """The llguidance grammar of a whole reply whose answer is ``answer`` (a grammar
        part) and whose tool calls' arguments are ``tools`` (name -> part, ``None``: free).
        By default the whole reply is the answer (tool calls are not constrained)."""
        from .structured import grammar_json

        if any(p is not None for p in tools.values()):
            logger.info("strict tools: this chat format's tool calls are not constrained")
        return grammar_json([answer]) if answer is not None else None

    def reasoning_budget(self, limit: int, primer: Sequence[int] = ()) -> Any:
        """A tracker that ends the reply's reasoning after ``limit`` tokens (see
        :class:`~.structured.Budget`); ``None`` for formats without a reasoning channel."""
        return None

    @abstractmethod
    def parser(self, primer: Sequence[int] = (), *, raw: bool = False) -> ReplyParser:
        """A fresh reply parser (primed with ``primer``); ``raw`` reads plain text only."""

    def detokenizer(self) -> Detokenizer:
        """A fresh streaming detokenizer (the token table is built once per format)."""
        proto = self.__dict__.get("_detok_proto")
        if proto is None:
            proto = self.__dict__["_detok_proto"] = Detokenizer(list(self.token_bytes()))
        return proto.fresh()

    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes())


class TextParser:
    """A reply that is plain text: every token is answer text."""

    def __init__(self, detok: Detokenizer) -> None:
        self._detok = detok
        self.claimed: list[tuple[int, str]] = []

    def push(self, token: int) -> list[Delta]:
        self.claimed = [(0, ANSWER)]
        return [Delta("final", self._detok.push(token))]

    def finish(self) -> list[Delta]:
        self.claimed = []
        return [Delta("final", self._detok.flush())]

    def tool_calls(self) -> list[ToolCall]:
        return []


class ChatTemplateFormat(ChatFormat):
    """Any mlx-lm model: its tokenizer's chat template, its end tokens, plain-text replies.

    OpenAI ``system`` and ``developer`` messages become one system message at the start
    (templates know no developer role, and a system message must replace the template's
    default). Tools go to the template; a template that ignores them is reported.
    """

    name = "chat-template"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._bytes: list[bytes] | None = None

    def render(
        self,
        messages: MessagesLike,
        *,
        tools: Sequence[Any] | None = None,
        tool_choice: ToolChoice = None,
        **options: Any,
    ) -> list[int]:
        items = [m for m in normalize_messages(messages) if isinstance(m, dict)]
        system = [m["content"] for m in items if m["role"] in ("system", "developer")]
        chat = [
            {
                k: v
                for k, v in m.items()
                if k in ("role", "content", "tool_calls", "name", "tool_call_id")
            }
            for m in items
            if m["role"] not in ("system", "developer")
        ]
        if system:
            chat.insert(0, {"role": "system", "content": "\n\n".join(s for s in system if s)})
        extra: dict[str, Any] = {}
        if tools and tool_choice != "none":
            specs = tool_specs(tools)
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters or {"type": "object", "properties": {}},
                    },
                }
                for t in specs
            ]
        ids = self._apply(chat, **extra)
        if extra and ids == self._apply(chat):
            logger.warning(
                "this model's chat template has no tool support: the %d tool(s) were left out "
                "of the prompt",
                len(extra["tools"]),
            )
        return ids

    def _apply(self, chat: list[dict[str, Any]], **extra: Any) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, **extra
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):  # a BatchEncoding
            out = out["input_ids"]
        return list(out)

    def stop_ids(self) -> list[int]:
        ids = getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id]
        return sorted(int(i) for i in ids if i is not None)

    def token_bytes(self) -> Sequence[bytes]:
        if self._bytes is None:
            self._bytes = tokenizer_bytes(self.tokenizer)
        return self._bytes

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def encode_text(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a tokenizer without the option
            return list(self.tokenizer.encode(text))

    def special_ids(self) -> Sequence[int]:
        tok = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
        ids = {int(i) for i in getattr(tok, "all_special_ids", None) or []}
        added = getattr(tok, "added_tokens_decoder", None) or {}
        ids |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
        return sorted(ids)

    def parser(self, primer: Sequence[int] = (), *, raw: bool = False) -> ReplyParser:
        return TextParser(self.detokenizer())
