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

from ..chat_format import ANSWER, REASONING
from ..tool_loop import BUILTIN_CALL, ToolEvent
from .choices import Choice
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


def usage(completions: list[Any]) -> dict[str, Any]:
    """OpenAI's ``usage`` object for the completions of one request's choices: the prompt
    counted once, the generated tokens of every choice added up."""
    us = [c.usage for c in completions]
    prompt = us[0].prompt_tokens
    generated = sum(u.completion_tokens for u in us)
    drafted, accepted = sum(u.drafted_tokens for u in us), sum(u.accepted_tokens for u in us)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": generated,
        "total_tokens": prompt + generated,
        "prompt_tokens_details": {"cached_tokens": us[0].cached_prompt_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": sum(u.reasoning_tokens for u in us),
            # Speculative decoding, in the fields OpenAI uses for predicted outputs.
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        },
    }


# A request ended by the server's shutdown (the engine's ``cancelled``): OpenAI's schema has
# no finish reason for it, so a stream ends with this error, a body is this 503.
def shutting_down() -> APIError:
    """The error of a request ended by the server's shutdown."""
    return APIError(
        503,
        "the server is shutting down",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


def finish_reason(reason: str, allowed: tuple[str, ...] = ("stop", "length", "tool_calls")) -> str:
    """OpenAI's ``finish_reason`` for the engine's (``cancelled`` never gets here)."""
    return reason if reason in allowed else "stop"


class CompletionWriter:
    """OpenAI's completion objects from a request's engine events (:class:`Choice` items,
    one engine request per choice): accumulated into one body (:meth:`add`, :meth:`body`)
    or turned into stream chunks (:meth:`start`, :meth:`chunks`), framed by :data:`CHUNKS`.

    A choice ended by the server's shutdown makes the body a 503 and ends the stream with
    an error item (:func:`shutting_down`); nothing follows it but ``[DONE]``."""

    framing: ClassVar[SSEFraming] = CHUNKS
    object_name = ""  # of the body
    chunk_object = ""  # of a stream chunk
    prefix = ""  # of the id

    def __init__(self, req: Any, opts: ServerOptions, client: EngineClient) -> None:
        self.req, self.opts, self.client = req, opts, client
        self.stream = req.stream
        self.n: int = req.n
        self.id = f"{self.prefix}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.parts: list[dict[str, list[str]]] = [
            {"content": [], "reasoning": []} for _ in range(self.n)
        ]
        self.completions: list[Any] = [None] * self.n
        self.ended = False  # the stream ended with an error item
        include = (req.stream_options or {}).get("include_usage", False)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        self.include_usage = bool(include)

    def head(self, chunk: bool = False) -> dict[str, Any]:
        """The fields every body (or ``chunk``) starts with."""
        return {
            "id": self.id,
            "object": self.chunk_object if chunk else self.object_name,
            "created": self.created,
            "model": self.opts.model_name,
            "system_fingerprint": f"mlx-harmony-core-{self.opts.version}",
        }

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A stream chunk (``usage: null`` before the last when usage is asked for)."""
        out = {**self.head(chunk=True), "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = bytes(self.client.token_bytes()[token])
        return raw.decode("utf-8", "replace"), list(raw)

    @staticmethod
    def _split(item: Any) -> tuple[int, Any]:
        return (item.index, item.event) if isinstance(item, Choice) else (0, item)

    def add(self, item: Any) -> None:
        """Take in one engine event: text deltas by kind, the final completion."""
        i, event = self._split(item)
        if event.completion is not None:
            self.completions[i] = event.completion
        elif event.recipient is None:
            key = "reasoning" if event.kind == REASONING else "content"
            self.parts[i][key].append(event.delta)

    def _shut_down(self) -> bool:
        return any(c is not None and c.finish_reason == "cancelled" for c in self.completions)

    def _usage(self) -> dict[str, Any]:
        return usage([c for c in self.completions if c is not None])

    def _check_body(self) -> None:
        """A 503 when the server's shutdown ended a choice."""
        if self._shut_down():
            raise shutting_down()

    def _finished(self, i: int, event: Any) -> list[dict[str, Any]] | None:
        """For the completion event of choice ``i``: the error item when the shutdown
        ended it (and the stream), else None."""
        self.completions[i] = event.completion
        if event.completion.finish_reason == "cancelled":
            self.ended = True
            return [self.framing.error(shutting_down())]
        return None

    def usage_chunk(self) -> list[dict[str, Any]]:
        """The last chunk, with ``usage``, when ``stream_options.include_usage`` asks and
        every choice is done."""
        if not self.include_usage or any(c is None for c in self.completions):
            return []
        return [{**self.head(chunk=True), "choices": [], "usage": self._usage()}]


class ChatWriter(CompletionWriter):
    """``chat.completion`` bodies and ``chat.completion.chunk`` chunks.

    Messages and deltas carry the reasoning as both ``reasoning_content`` and ``reasoning``
    (clients read one or the other); ``logprobs.content`` lists the tokens of the message's
    content only, each delta's with the delta; tool calls' arguments stream as they are
    generated."""

    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def __init__(self, req: Any, opts: ServerOptions, client: EngineClient) -> None:
        super().__init__(req, opts, client)
        self.logprobs = bool(req.logprobs)
        # Per choice: the tool calls streamed so far, id -> index in the delta's list.
        self.calls: list[dict[str, int]] = [{} for _ in range(self.n)]

    @staticmethod
    def _call(c: Any) -> dict[str, Any]:
        return {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }

    def _entries(self, lps: list[Any] | None) -> dict[str, Any] | None:
        """OpenAI's ``logprobs`` object for the tokens ``lps`` (None without logprobs)."""
        if not self.logprobs:
            return None
        out = []
        for lp in lps or []:
            text, raw = self._token(lp.token)
            top = []
            for tid, value in lp.top:
                t_text, t_raw = self._token(tid)
                top.append({"token": t_text, "logprob": value, "bytes": t_raw})
            out.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": out, "refusal": None}

    def body(self) -> dict[str, Any]:
        """The whole answer."""
        self._check_body()
        choices = []
        for i, c in enumerate(self.completions):
            content = "".join(self.parts[i]["content"])
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if self.parts[i]["reasoning"]:
                reasoning = "".join(self.parts[i]["reasoning"])
                message["reasoning_content"] = message["reasoning"] = reasoning
            if c.tool_calls:
                message["tool_calls"] = [self._call(call) for call in c.tool_calls]
                message["content"] = content or None
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": self._entries(c.content_logprobs),
                    "finish_reason": finish_reason(c.finish_reason),
                }
            )
        return {**self.head(), "choices": choices, "usage": self._usage()}

    def _choice(self, i: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": None, **extra}

    def add(self, item: Any) -> None:
        """Take in one engine event; built-in tool calls join the reasoning."""
        i, event = self._split(item)
        shown = builtin_reasoning(event)
        if shown is None:
            super().add(item)
        elif shown:
            self.parts[i]["reasoning"].append(shown)

    def start(self) -> list[dict[str, Any]]:
        """Chunks before the first event: each choice's role."""
        return [
            self.chunk([self._choice(i, {"role": "assistant", "content": ""})])
            for i in range(self.n)
        ]

    def _tool_delta(self, i: int, event: Any) -> dict[str, Any]:
        calls = self.calls[i]
        if event.call_id in calls:
            return {"index": calls[event.call_id], "function": {"arguments": event.delta}}
        calls[event.call_id] = len(calls)
        name = (event.recipient or "").removeprefix("functions.")
        return {
            "index": calls[event.call_id],
            "id": event.call_id,
            "type": "function",
            "function": {"name": name, "arguments": event.delta},
        }

    def chunks(self, item: Any) -> list[dict[str, Any]]:
        """Chunks for one engine event."""
        if self.ended:
            return []
        i, event = self._split(item)
        shown = builtin_reasoning(event)
        if shown is not None:  # a built-in tool call (the engine ran it): shown as reasoning
            self.add(item)
            delta = {"reasoning_content": shown, "reasoning": shown}
            return [self.chunk([self._choice(i, delta)])] if shown else []
        if event.completion is None:
            self.add(item)
            if not event.delta:
                return []
            if event.recipient is not None:
                if event.call_id is None:
                    return []  # a message to a tool that is not a function: not shown
                return [self.chunk([self._choice(i, {"tool_calls": [self._tool_delta(i, event)]})])]
            if event.kind == REASONING:
                delta = {"reasoning_content": event.delta, "reasoning": event.delta}
                return [self.chunk([self._choice(i, delta)])]
            logprobs = self._entries(event.logprobs) if event.kind == ANSWER else None
            return [self.chunk([self._choice(i, {"content": event.delta}, logprobs=logprobs)])]
        error = self._finished(i, event)
        if error is not None:
            return error
        c = event.completion
        out = []
        # Calls whose arguments were not streamed (a format that reads them at the end).
        rest = [call for call in c.tool_calls if call.id not in self.calls[i]]
        if rest:
            start = len(self.calls[i])
            calls = [{"index": start + k, **self._call(call)} for k, call in enumerate(rest)]
            out.append(self.chunk([self._choice(i, {"tool_calls": calls})]))
        out.append(self.chunk([self._choice(i, {}, finish_reason=finish_reason(c.finish_reason))]))
        return out + self.usage_chunk()


def builtin_reasoning(event: Any) -> str | None:
    """The reasoning text a built-in tool call shows in chat completions: the call when it
    starts, the tool's output when done (``""``: its code as written, shown with the call;
    ``None``: not a built-in call's event)."""
    if event.completion is not None or event.kind != BUILTIN_CALL:
        return None
    if not isinstance(event, ToolEvent):
        return ""
    if event.phase == "running":
        return f"\n[{event.recipient}] {event.call.arguments.strip()}\n"
    r = event.result
    return f"[{event.recipient}: {r.status}]\n{r.text.rstrip()}\n\n"


class TextWriter(CompletionWriter):
    """``text_completion`` bodies and chunks (``/v1/completions``); each chunk carries the
    logprobs of its text's tokens."""

    object_name = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl-"

    def __init__(self, req: Any, opts: ServerOptions, client: EngineClient) -> None:
        super().__init__(req, opts, client)
        self.logprobs = req.logprobs is not None
        self.offsets = [0] * self.n  # per choice: the text's length so far

    def _entries(self, lps: list[Any] | None, start: int) -> dict[str, Any] | None:
        """The legacy ``logprobs`` object of tokens ``lps``; offsets from ``start``."""
        if not self.logprobs:
            return None
        tokens, values, tops, offsets, pos = [], [], [], [], start
        for lp in lps or []:
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
        self._check_body()
        choices = [
            {
                "index": i,
                "text": "".join(self.parts[i]["content"]),
                "logprobs": self._entries(c.content_logprobs, 0),
                "finish_reason": finish_reason(c.finish_reason, ("stop", "length")),
            }
            for i, c in enumerate(self.completions)
        ]
        return {**self.head(), "choices": choices, "usage": self._usage()}

    def start(self) -> list[dict[str, Any]]:
        """Chunks before the first event: none."""
        return []

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A stream chunk (the legacy completion object has no ``usage: null``)."""
        return {**self.head(chunk=True), "choices": choices}

    def chunks(self, item: Any) -> list[dict[str, Any]]:
        """Chunks for one engine event."""
        if self.ended:
            return []
        i, event = self._split(item)
        if event.completion is None:
            self.add(item)
            if not event.delta or event.recipient is not None or event.kind == REASONING:
                return []
            logprobs = self._entries(event.logprobs, self.offsets[i])
            self.offsets[i] += len(event.delta)
            choice = {"index": i, "text": event.delta, "logprobs": logprobs, "finish_reason": None}
            return [self.chunk([choice])]
        error = self._finished(i, event)
        if error is not None:
            return error
        reason = finish_reason(event.completion.finish_reason, ("stop", "length"))
        choice = {"index": i, "text": "", "logprobs": None, "finish_reason": reason}
        return [self.chunk([choice]), *self.usage_chunk()]
