"""What goes back to the client: Server-Sent Events framing, and the writers that turn a
request's engine events into OpenAI's response objects.

A streamed answer is a sequence of JSON items, each framed as one event by an
:class:`SSEFraming`:

- :data:`CHUNKS` (chat and text completions): ``data: {chunk}`` per item, and
  ``data: [DONE]`` after the last; an error mid-stream is ``data: {"error": {...}}``.
- :data:`TYPED_EVENTS` (OpenAI's Responses API): ``event: <item["type"]>`` then
  ``data: {item}`` per item, no terminator (the last event says the response is done); an
  error mid-stream is an ``error`` event ``{"type": "error", "code", "message", "param"}``.
  Numbering the events (``sequence_number``) is the writer's part.

A writer (see :class:`StreamWriter`) names its framing; :func:`~.serving.respond` drives
any writer, so a new endpoint is a new writer plus its route.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from ..chat_format import REASONING
from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError


@dataclass(frozen=True)
class SSEFraming:
    """How a stream's items are written as Server-Sent Events.

    ``typed``: each item is a typed event (``event: <item["type"]>`` line before its
    data); ``done``: the bytes after the last item (``data: [DONE]``), or empty.
    """

    typed: bool
    done: bytes

    def frame(self, item: dict[str, Any]) -> bytes:
        """One item as one event."""
        data = b"data: " + json.dumps(item, ensure_ascii=False).encode() + b"\n\n"
        if self.typed:
            return b"event: " + str(item["type"]).encode() + b"\n" + data
        return data

    def error(self, err: APIError) -> dict[str, Any]:
        """The item that reports ``err`` in a stream already started (HTTP 200 sent)."""
        if self.typed:
            return {"type": "error", "code": err.code, "message": err.message, "param": err.param}
        return {"error": {"message": err.message, "type": err.type, "code": err.code}}


CHUNKS = SSEFraming(typed=False, done=b"data: [DONE]\n\n")
TYPED_EVENTS = SSEFraming(typed=True, done=b"")


class StreamWriter(Protocol):
    """What :func:`~.serving.respond` needs of a writer: for a streamed request, the items
    to send first and those each engine event makes; otherwise the events added up and
    the one body."""

    framing: SSEFraming
    stream: bool

    def start(self) -> list[dict[str, Any]]:
        """Items before the first event."""
        ...

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        """Items for one engine event (the last one carries the completion)."""
        ...

    def add(self, event: Any) -> None:
        """Take in one engine event (not streaming)."""
        ...

    def body(self) -> dict[str, Any]:
        """The whole answer, after the last event (not streaming)."""
        ...


def usage(completion: Any) -> dict[str, Any]:
    """OpenAI's ``usage`` object for a completion."""
    u = completion.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        # Speculative decoding, in the fields OpenAI uses for predicted outputs.
        "completion_tokens_details": {
            "accepted_prediction_tokens": u.accepted_tokens,
            "rejected_prediction_tokens": u.drafted_tokens - u.accepted_tokens,
        },
    }


def finish_reason(reason: str) -> str:
    """OpenAI's ``finish_reason`` for the engine's."""
    # "cancelled": the server is shutting down (a disconnected client sees nothing).
    return reason if reason in ("stop", "length", "tool_calls", "cancelled") else "stop"


class CompletionWriter:
    """OpenAI's completion objects from a request's engine events: accumulated into one
    body (:meth:`add`, :meth:`body`) or turned into stream chunks (:meth:`start`,
    :meth:`chunks`), framed by :data:`CHUNKS`."""

    framing: ClassVar[SSEFraming] = CHUNKS
    object_name = ""  # of the body
    chunk_object = ""  # of a stream chunk
    prefix = ""  # of the id

    def __init__(self, req: Any, opts: ServerOptions, client: EngineClient) -> None:
        self.req, self.opts, self.client = req, opts, client
        self.stream = req.stream
        self.id = f"{self.prefix}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.completion: Any = None
        include = (req.stream_options or {}).get("include_usage", False)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        self.include_usage = bool(include)

    def head(self) -> dict[str, Any]:
        """The fields every body and chunk starts with."""
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.opts.model_name,
            "system_fingerprint": f"mlx-harmony-core-{self.opts.version}",
        }

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = bytes(self.client.token_bytes()[token])
        return raw.decode("utf-8", "replace"), list(raw)

    def add(self, event: Any) -> None:
        """Take in one engine event: text deltas by channel, the final completion."""
        if event.completion is not None:
            self.completion = event.completion
        elif event.recipient is None:
            key = "reasoning" if event.kind == REASONING else "content"
            self.parts[key].append(event.delta)

    def usage_chunk(self) -> list[dict[str, Any]]:
        """The last chunk, with ``usage``, when ``stream_options.include_usage`` asks."""
        if not self.include_usage or self.completion is None:
            return []
        head = {**self.head(), "object": self.chunk_object}
        return [{**head, "choices": [], "usage": usage(self.completion)}]


class ChatWriter(CompletionWriter):
    """``chat.completion`` bodies and ``chat.completion.chunk`` chunks."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.completion.tool_calls
        ]

    def _logprobs(self) -> dict[str, Any] | None:
        lps = self.completion.logprobs
        if lps is None:
            return None
        out = []
        for lp in lps:
            text, raw = self._token(lp.token)
            top = []
            for tid, value in lp.top:
                t_text, t_raw = self._token(tid)
                top.append({"token": t_text, "logprob": value, "bytes": t_raw})
            out.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": out}

    def body(self) -> dict[str, Any]:
        """The whole answer."""
        c = self.completion
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.parts["content"])}
        if self.parts["reasoning"]:
            message["reasoning_content"] = "".join(self.parts["reasoning"])
        if c.tool_calls:
            message["tool_calls"] = self._calls()
            message["content"] = message["content"] or None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(),
            "finish_reason": finish_reason(c.finish_reason),
        }
        return {**self.head(), "choices": [choice], "usage": usage(c)}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return {**self.head(), "object": "chat.completion.chunk", "choices": [choice]}

    def start(self) -> list[dict[str, Any]]:
        """Chunks before the first event."""
        return [self._chunk({"role": "assistant", "content": ""})]

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        """Chunks for one engine event."""
        self.add(event)
        if event.completion is None:
            if event.recipient is not None or not event.delta:
                return []  # tool-call arguments are sent whole, with their id, at the end
            key = "reasoning_content" if event.kind == REASONING else "content"
            return [self._chunk({key: event.delta})]
        out = []
        if self.completion.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(self._calls())]
            out.append(self._chunk({"tool_calls": calls}))
        out.append(
            self._chunk({}, finish_reason(self.completion.finish_reason), logprobs=self._logprobs())
        )
        return out + self.usage_chunk()


class TextWriter(CompletionWriter):
    """``text_completion`` bodies and chunks (``/v1/completions``)."""

    object_name = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl-"

    def _logprobs(self) -> dict[str, Any] | None:
        lps = self.completion.logprobs
        if lps is None:
            return None
        tokens, values, tops, offsets, pos = [], [], [], [], 0
        for lp in lps:
            text, _ = self._token(lp.token)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self._token(t)[0]: v for t, v in lp.top})
            offsets.append(pos)
            pos += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def body(self) -> dict[str, Any]:
        """The whole answer."""
        c = self.completion
        choice = {
            "index": 0,
            "text": "".join(self.parts["content"]),
            "logprobs": self._logprobs(),
            "finish_reason": finish_reason(c.finish_reason),
        }
        return {**self.head(), "choices": [choice], "usage": usage(c)}

    def start(self) -> list[dict[str, Any]]:
        """Chunks before the first event."""
        return []

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        """Chunks for one engine event."""
        self.add(event)
        if event.completion is None:
            if not event.delta:
                return []
            choice = {"index": 0, "text": event.delta, "logprobs": None, "finish_reason": None}
            return [{**self.head(), "choices": [choice]}]
        choice = {
            "index": 0,
            "text": "",
            "logprobs": self._logprobs(),
            "finish_reason": finish_reason(self.completion.finish_reason),
        }
        return [{**self.head(), "choices": [choice]}, *self.usage_chunk()]
