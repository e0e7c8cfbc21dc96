"""``/v1/responses``: OpenAI's Responses API over the engine.

A request's items become chat messages (:mod:`.items`), which the model's chat format
renders (Harmony for GPT-OSS); the reply's events become output items in Harmony's order:
``reasoning`` (the reasoning channel), ``message`` (final answer, or a commentary preamble) and
``function_call`` (commentary ``to=functions.X``). :class:`ResponsesWriter` turns the
events into OpenAI's typed stream events, or accumulates them into one response body; both
go through the same state machine, so a streamed response ends equal to the body.

Stored responses (``store: true``) go to the SQLite :class:`~.store.ResponseStore`;
``previous_response_id`` continues from one. Stateless clients get their reasoning back
sealed in ``encrypted_content`` (``include: ["reasoning.encrypted_content"]``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from .._paths import home
from ..chat_format import REASONING, TOOL_CALL
from ..tool_loop import BUILTIN_CALL, ToolEvent
from .client import EngineClient
from .items import (
    ReasoningSealer,
    builtin_tools,
    check_calls,
    echo_tools,
    engine_tool_choice,
    engine_tools,
    new_id,
    normalize_input,
    response_format,
    to_messages,
)
from .options import ServerOptions
from .protocol import APIError, ResponsesRequest, parse_body
from .serving import check_model, respond, speculation
from .store import ResponseStore
from .writers import SSEFraming

logger = logging.getLogger(__name__)

ENCRYPTED = "reasoning.encrypted_content"
LOGPROBS = "message.output_text.logprobs"
INCLUDES = frozenset(
    {
        ENCRYPTED,
        LOGPROBS,
        "file_search_call.results",
        "web_search_call.results",
        "web_search_call.action.sources",
        "message.input_image.image_url",
        "computer_call_output.output.image_url",
        "code_interpreter_call.outputs",
    }
)
EFFORTS = {"none": "low", "minimal": "low", "low": "low", "medium": "medium", "high": "high"}
EFFORTS["xhigh"] = "high"


@dataclass
class ResponsesService:
    """What the Responses endpoints share: the store (None with ``--no-store``), the key
    that seals reasoning."""

    store: ResponseStore | None
    sealer: ReasoningSealer

    @classmethod
    def open(cls, opts: ServerOptions) -> ResponsesService:
        """The service for ``opts`` (the database opened, or a :class:`StoreError`)."""
        store = None
        if opts.store:
            path = Path(opts.responses_db) if opts.responses_db else home() / "responses.db"
            store = ResponseStore(path)
        key_dir = store.path.parent if store is not None else home()
        return cls(store, ReasoningSealer.from_file(key_dir / "responses.key"))

    def close(self) -> None:
        """Close the database."""
        if self.store is not None:
            self.store.close()


# -- the request --------------------------------------------------------------------------------


def parse(body: bytes) -> ResponsesRequest:
    """The body as a :class:`ResponsesRequest` (whose ``user``, ``store`` and ``metadata``
    count); a 400 naming the first problem."""
    return parse_body(ResponsesRequest, body, frozenset())  # type: ignore[no-any-return]


@dataclass
class Plan:
    """A checked request: what to generate from, and what the response echoes."""

    req: ResponsesRequest
    items: list[dict[str, Any]]  # this request's input items (stored shape)
    history: list[dict[str, Any]]  # the items of the conversation before them
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    tool_choice: Any
    effort: str
    include: frozenset[str]
    store: bool
    echo: list[dict[str, Any]] = field(default_factory=list)  # the tools, as given
    # The previous response's prompt and reply token ids, when it ended in a tool call:
    # the continuation extends them (the prefix cache then holds all but the new input).
    prev_tokens: dict[str, list[int]] | None = None
    # The built-in tools the request declares (and the server runs): python, browser.
    builtin: list[str] = field(default_factory=list)
    # The first stored response of the conversation (its tools' state is keyed by it).
    root: str | None = None


def plan(req: ResponsesRequest, service: ResponsesService, opts: ServerOptions) -> Plan:
    """Check ``req`` against the store and the server's limits (400 / 404 naming the
    parameter) and map its items to messages. Writes nothing."""
    check_model(req.model, opts)
    if req.n != 1:
        raise APIError(400, "n > 1 is not supported: send n requests", param="n")
    if req.background:
        raise APIError(400, "background responses are not supported", param="background")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")
    for name in ("max_output_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None and value > opts.max_tokens_limit:
            raise APIError(
                400,
                f"{name} is {value}, over this server's limit of {opts.max_tokens_limit} "
                "(--max-tokens-limit)",
                param=name,
            )
    if req.metadata is not None and (
        len(req.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in req.metadata.items())
    ):
        raise APIError(
            400,
            "metadata takes up to 16 keys of 64 and values of 512 characters",
            param="metadata",
        )
    include = frozenset(req.include or ())
    unknown = sorted(include - INCLUDES)
    if unknown:
        raise APIError(400, f"include has unknown value {unknown[0]!r}", param="include")
    effort = (req.reasoning or {}).get("effort") or "medium"
    if effort not in EFFORTS:
        raise APIError(
            400, f"reasoning.effort must be one of {sorted(EFFORTS)}", param="reasoning.effort"
        )
    history: list[dict[str, Any]] = []
    prev_tokens = None
    root = None
    if req.previous_response_id is not None:
        if service.store is None:
            raise APIError(
                400,
                "this server keeps no responses (--no-store); send the whole conversation",
                param="previous_response_id",
            )
        found = service.store.conversation(req.previous_response_id)
        if found is None:
            raise APIError(
                404,
                f"previous response {req.previous_response_id!r} was not found",
                param="previous_response_id",
                code="not_found",
            )
        history = found
        root = _root(service.store, req.previous_response_id)
        if history and history[-1]["type"] in ("function_call", "custom_tool_call"):
            prev_tokens = service.store.tokens(req.previous_response_id)
    if req.input is None and not history:
        raise APIError(400, "input is required", param="input")
    items = normalize_input(req.input if req.input is not None else [], service.sealer)
    check_calls(history, items)
    tools = engine_tools(req.tools)
    builtin = builtin_tools(req.tools, opts.tools)
    tool_choice = engine_tool_choice(req.tool_choice, tools)
    if tool_choice not in (None, "none", "auto") and not tools and not builtin:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    messages = to_messages([*history, *items], req.instructions)
    store = req.store and service.store is not None
    return Plan(
        req,
        items,
        history,
        messages,
        tools,
        tool_choice,
        effort,
        include,
        store,
        echo_tools(req.tools),
        prev_tokens,
        builtin,
        root,
    )


def _root(store: ResponseStore, response_id: str, hops: int = 10000) -> str:
    """The first stored response of the conversation ``response_id`` continues."""
    for _ in range(hops):
        found = store.get(response_id)
        prev = found.get("previous_response_id") if found else None
        if not prev or store.get(prev) is None:
            break
        response_id = prev
    return response_id


def continued(client: EngineClient, p: Plan, render: dict[str, Any]) -> list[int] | None:
    """The prompt of a continuation as the previous request's exact tokens (prompt and
    reply) followed by the new items' tokens, when that is what rendering the whole
    conversation gives up to the model's own spelling of its reply (same instructions,
    tools and reasoning kept); None otherwise (the conversation is rendered whole)."""
    render_fn = getattr(client, "render", None)
    if p.prev_tokens is None or render_fn is None or p.req.truncation == "auto":
        return None
    prompt, reply = p.prev_tokens["prompt"], p.prev_tokens["reply"]
    head = client.encode("<|start|>assistant")
    old = render_fn(to_messages(p.history, p.req.instructions), **render)
    new = render_fn(p.messages, **render)
    cut = len(old) - len(head)
    # Where the previous prompt ended (before its primer: a forced call's header).
    end = max((i for i in range(len(prompt)) if prompt[i : i + len(head)] == head), default=-1)
    if cut < 0 or old[cut:] != head or new[:cut] != old[:cut] or end < 0:
        return None
    if prompt[:end] != old[:end]:
        return None
    return [*prompt, *reply, *new[cut:]]


async def create_response(
    http: HTTPRequest, client: EngineClient, opts: ServerOptions, service: ResponsesService
) -> Response:
    """``POST /v1/responses``: one response body, or its typed event stream."""
    body = await http.body()
    req = await asyncio.to_thread(parse, body) if len(body) > 2**16 else parse(body)
    p = await asyncio.to_thread(plan, req, service, opts)
    params = req.params()
    stops = req.stops()
    max_tokens = req.max_output_tokens or req.max_tokens or opts.default_max_tokens
    budget = req.max_reasoning_tokens
    if budget is None:
        budget = opts.max_reasoning_tokens
    render: dict[str, Any] = {"reasoning_effort": EFFORTS[p.effort]}
    if p.tools:
        render["tools"] = p.tools
        render["tool_choice"] = p.tool_choice
    tool_loop: dict[str, Any] = {}
    if p.builtin:  # enabled twice: by the server (--tools) and by this request's tools
        limit = opts.max_tool_calls
        if req.max_tool_calls is not None:
            limit = min(limit, req.max_tool_calls)
        tool_loop = {"builtin_tools": p.builtin, "max_tool_calls": limit}
    writer = ResponsesWriter(p, opts, client, service, max_tokens)
    if p.builtin and p.store:  # python's variables live on in the responses that continue it
        tool_loop["tool_session"] = f"resp_{p.root or writer.id}"
    logprobs = (req.top_logprobs or 0) if LOGPROBS in p.include else None
    fmt = response_format(req.text)

    def build() -> Any:
        request = client.request(
            continued(client, p, render) or p.messages,
            params,
            max_tokens=max_tokens,
            stop=stops,
            logprobs=logprobs,
            response_format=fmt,
            max_reasoning_tokens=budget,
            truncate=req.truncation == "auto",
            **speculation(opts),
            **render,
            **tool_loop,
        )
        writer.prompt_ids = getattr(request, "prompt_ids", None)
        return request

    return await respond(http, client, build, writer)


# -- the writer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponsesFraming(SSEFraming):
    """Typed events whose mid-stream error is OpenAI's ``error`` event (numbered) followed
    by ``response.failed``."""

    writer: Any = None

    def frame(self, item: dict[str, Any]) -> bytes:
        """One event (two for a failure: the error, then ``response.failed``)."""
        then = item.pop("_then", None)
        out = super().frame(item)
        return out + super().frame(then) if then is not None else out

    def error(self, err: APIError) -> dict[str, Any]:
        """The ``error`` event for ``err``, with ``response.failed`` after it."""
        return self.writer.failed(err)


class ResponsesWriter:
    """A response's output items from the engine's events, as typed stream events
    (:meth:`start`, :meth:`chunks`) or one body (:meth:`add`, :meth:`body`)."""

    KINDS: ClassVar[dict[str, str]] = {REASONING: "reasoning", TOOL_CALL: "function_call"}

    def __init__(
        self,
        plan: Plan,
        opts: ServerOptions,
        client: EngineClient,
        service: ResponsesService,
        max_tokens: int,
    ) -> None:
        self.plan, self.opts, self.client, self.service = plan, opts, client, service
        self.req = plan.req
        self.stream = plan.req.stream
        self.framing = ResponsesFraming(typed=True, done=b"", writer=self)
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.max_tokens = max_tokens
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.key: tuple[str, str | None] | None = None  # the open item's (kind, recipient)
        self.text: list[str] = []  # the open item's text so far
        self.status = "in_progress"
        self.completion: Any = None
        self.incomplete: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.completed_at: int | None = None
        self.final: dict[str, Any] | None = None
        self.prompt_ids: list[int] | None = None  # set when the request is built
        self.custom = {t["name"] for t in plan.tools if t.get("custom")}

    # -- objects --

    def response(self) -> dict[str, Any]:
        """The response object as it stands."""
        req, p = self.req, self.plan
        tool_choice = p.tool_choice
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            kind = "custom" if name in self.custom else "function"
            tool_choice = {"type": kind, "name": name}
        fmt = (req.text or {}).get("format") or {"type": "text"}
        out: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "completed_at": self.completed_at,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls,
            "model": self.opts.model_name,
            "output": copy.deepcopy(self.output),
            "parallel_tool_calls": True
            if req.parallel_tool_calls is None
            else req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": p.effort, "summary": None},
            "store": p.store,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": fmt},
            "tool_choice": tool_choice or "auto",
            "tools": p.echo,
            "top_logprobs": req.top_logprobs,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": req.truncation or "disabled",
            "usage": self.usage(),
            "user": req.user,
            "metadata": req.metadata or {},
            "background": False,
            "service_tier": "default",
        }
        for key in ("usage", "user"):  # not nullable in OpenAI's schema: left out until set
            if out[key] is None:
                del out[key]
        return out

    def usage(self) -> dict[str, Any] | None:
        """``usage``, once the reply is done."""
        c = self.completion
        if c is None:
            return None
        u = c.usage
        return {
            "input_tokens": u.prompt_tokens,
            "input_tokens_details": {
                "cached_tokens": u.cached_prompt_tokens,
                "cache_write_tokens": 0,
            },
            "output_tokens": u.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return event

    # -- items --

    def _open(self, kind: str, recipient: str | None) -> list[dict[str, Any]]:
        index = len(self.output)
        self.key, self.text = (kind, recipient), []
        item: dict[str, Any] = {"id": new_id(kind), "type": kind}
        part: dict[str, Any] | None = None
        if kind == "reasoning":
            item.update(summary=[], content=[], status="in_progress")
            part = {"type": "reasoning_text", "text": ""}
        elif kind == "message":
            item.update(role="assistant", content=[], status="in_progress")
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            name = (recipient or "").removeprefix("functions.")
            call_id = f"call_{uuid.uuid4().hex[:24]}"
            if name in self.custom:
                item = {"id": new_id("custom_tool_call"), "type": "custom_tool_call"}
                item.update(call_id=call_id, name=name, input="")
            else:
                item.update(call_id=call_id, name=name, arguments="", status="in_progress")
        self.output.append(item)
        events = [self._event("response.output_item.added", output_index=index, item=dict(item))]
        if part is not None:
            item["content"].append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        return events

    def _token(self, token: int, value: float) -> dict[str, Any]:
        raw = bytes(self.client.token_bytes()[token])
        return {"token": raw.decode("utf-8", "replace"), "logprob": value, "bytes": list(raw)}

    def _delta(self, delta: str, lps: Any = None) -> list[dict[str, Any]]:
        self.text.append(delta)
        index = len(self.output) - 1
        item = self.output[index]
        where = {"item_id": item["id"], "output_index": index}
        if item["type"] == "function_call":
            return [self._event("response.function_call_arguments.delta", **where, delta=delta)]
        if item["type"] == "custom_tool_call":
            return [self._event("response.custom_tool_call_input.delta", **where, delta=delta)]
        where["content_index"] = 0
        if item["type"] == "reasoning":
            return [self._event("response.reasoning_text.delta", **where, delta=delta)]
        short: list[dict[str, Any]] = []
        if lps and LOGPROBS in self.plan.include:  # the tokens whose text this delta is
            full = [
                {
                    **self._token(lp.token, lp.logprob),
                    "top_logprobs": [self._token(t, v) for t, v in lp.top],
                }
                for lp in lps
            ]
            item["content"][0]["logprobs"] += full
            short = [
                {
                    "token": f["token"],
                    "logprob": f["logprob"],
                    "top_logprobs": [
                        {"token": t["token"], "logprob": t["logprob"]} for t in f["top_logprobs"]
                    ],
                }
                for f in full
            ]
        return [self._event("response.output_text.delta", **where, delta=delta, logprobs=short)]

    def _close(self, status: str, call_args: str | None = None) -> list[dict[str, Any]]:
        if self.key is None:
            return []
        self.key = None
        index = len(self.output) - 1
        item = self.output[index]
        text = "".join(self.text)
        where = {"item_id": item["id"], "output_index": index}
        events = []
        if item["type"] != "custom_tool_call":
            item["status"] = status
        if item["type"] in ("code_interpreter_call", "web_search_call"):  # never ran
            item["status"] = "incomplete" if item["type"] == "code_interpreter_call" else "failed"
        elif item["type"] == "custom_tool_call":
            item["input"] = call_args if call_args is not None else text.strip()
            events.append(
                self._event("response.custom_tool_call_input.done", **where, input=item["input"])
            )
        elif item["type"] == "function_call":
            item["arguments"] = call_args if call_args is not None else text.strip()
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            part = item["content"][0]
            part["text"] = text
            where["content_index"] = 0
            if item["type"] == "reasoning":
                events.append(self._event("response.reasoning_text.done", **where, text=text))
                if ENCRYPTED in self.plan.include:
                    item["encrypted_content"] = self.service.sealer.seal(text)
            else:
                events += self._citations(item, where)
                events.append(
                    self._event(
                        "response.output_text.done",
                        **where,
                        text=part["text"],
                        logprobs=part["logprobs"],
                    )
                )
            events.append(
                self._event("response.content_part.done", **where, part=copy.deepcopy(part))
            )
        events.append(
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))
        )
        return events

    def _citations(self, item: dict[str, Any], where: dict[str, Any]) -> list[dict[str, Any]]:
        """The browser's citations in the answer: its text with them resolved and their
        ``url_citation`` annotations (one ``annotation.added`` event each)."""
        c = self.completion
        part = item["content"][0]
        cited = getattr(c, "cited", None) if c is not None else None
        if not cited or part["text"] != c.text:
            return []
        part["text"], annotations = cited[0], []
        events = []
        for i, a in enumerate(cited[1]):
            annotation = {
                "type": "url_citation",
                "url": a["url"],
                "title": a.get("title") or a["url"],
                "start_index": a["start_index"],
                "end_index": a["end_index"],
            }
            annotations.append(annotation)
            events.append(
                self._event(
                    "response.output_text.annotation.added",
                    **where,
                    annotation_index=i,
                    annotation=annotation,
                )
            )
        part["annotations"] = annotations
        return events

    # -- the writer protocol --

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        snapshot = self.response()
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=copy.deepcopy(snapshot)),
        ]

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        """The events one engine event makes."""
        if event.completion is not None:
            return self._finish(event.completion)
        if event.kind == BUILTIN_CALL:
            return self._builtin(event)
        if not event.delta:
            return []
        if event.kind == TOOL_CALL or event.recipient:
            key = ("function_call", event.recipient)
        else:
            key = (self.KINDS.get(event.kind, "message"), None)
        out = []
        if key != self.key:
            out += self._close("completed")
            out += self._open(*key)
        return out + self._delta(event.delta, getattr(event, "logprobs", None))

    # -- built-in tools: code_interpreter_call and web_search_call items --

    def _builtin(self, event: Any) -> list[dict[str, Any]]:
        """A built-in call's events: python's code streams into a ``code_interpreter_call``
        (in progress, code deltas, interpreting, completed); a browser action is a
        ``web_search_call`` (in progress, searching, completed) once the call is whole."""
        python = event.recipient == "python"
        kind = "code_interpreter_call" if python else "web_search_call"
        out: list[dict[str, Any]] = []
        if self.key != (kind, event.call_id):
            if not python and not isinstance(event, ToolEvent):
                return []  # a browser call's arguments: its action is shown when it runs
            out += self._close("completed")
            out += self._open_builtin(kind, event)
        index = len(self.output) - 1
        item = self.output[index]
        where = {"output_index": index, "item_id": item["id"]}
        if not isinstance(event, ToolEvent):  # python's code as it is written
            if event.delta:
                item["code"] += event.delta
                out.append(
                    self._event("response.code_interpreter_call_code.delta", **where,
                                delta=event.delta)
                )  # fmt: skip
            return out
        if event.phase == "running":
            if python:
                item["code"] = event.call.arguments
                out.append(
                    self._event("response.code_interpreter_call_code.done", **where,
                                code=item["code"])
                )  # fmt: skip
                out.append(self._event("response.code_interpreter_call.interpreting", **where))
            else:
                out.append(self._event("response.web_search_call.searching", **where))
            return out
        result = event.result
        self.key = None
        item["status"] = {"failed": "failed", "incomplete": "incomplete"}.get(
            result.status, "completed"
        )
        if python:
            if "code_interpreter_call.outputs" in self.plan.include:
                item["outputs"] = [{"type": "logs", "logs": result.text}]
            out.append(self._event("response.code_interpreter_call.completed", **where))
        else:
            if item["status"] == "incomplete":  # not among a web search call's states
                item["status"] = "failed"
            item["action"] = _action(
                (result.details or {}).get("action") or item["action"],
                (result.details or {}).get("sources"),
                "web_search_call.action.sources" in self.plan.include,
            )
            out.append(self._event("response.web_search_call.completed", **where))
        out.append(
            self._event("response.output_item.done", output_index=index, item=copy.deepcopy(item))
        )
        return out

    def _open_builtin(self, kind: str, event: Any) -> list[dict[str, Any]]:
        index = len(self.output)
        self.key, self.text = (kind, event.call_id), []
        item: dict[str, Any] = {"id": event.call_id, "type": kind, "status": "in_progress"}
        if kind == "code_interpreter_call":
            item.update(container_id=f"cntr_{self.id[5:]}", code="", outputs=None)
        else:
            item["action"] = _action(_browser_action(event), None, False)
        self.output.append(item)
        where = {"output_index": index, "item_id": item["id"]}
        return [
            self._event("response.output_item.added", output_index=index, item=dict(item)),
            self._event(f"response.{kind}.in_progress", **where),
        ]

    def _finish(self, completion: Any) -> list[dict[str, Any]]:
        self.completion = completion
        reason = completion.finish_reason
        status = {"length": "incomplete", "cancelled": "cancelled"}.get(reason, "completed")
        calls = [c.arguments for c in completion.tool_calls]
        args = None
        if self.key is not None and self.key[0] == "function_call":
            n = sum(1 for it in self.output if it["type"] in ("function_call", "custom_tool_call"))
            args = calls[n - 1] if len(calls) == n else None
        events = self._close("incomplete" if status == "incomplete" else "completed", args)
        self.status = status
        if status == "incomplete":
            self.incomplete = {"reason": "max_output_tokens"}
        else:
            self.completed_at = int(time.time())
        final = self.response()
        self.final = final
        if self.plan.store and status in ("completed", "incomplete"):
            assert self.service.store is not None
            context = [*self.plan.history, *self.plan.items]
            tokens = None
            if self.prompt_ids is not None:
                tokens = {"prompt": list(self.prompt_ids), "reply": list(completion.tokens)}
            self.service.store.put(final, self.plan.items, context, tokens)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=copy.deepcopy(final))]

    def add(self, event: Any) -> None:
        """Take in one engine event (not streaming)."""
        self.chunks(event)

    def body(self) -> dict[str, Any]:
        """The finished response."""
        assert self.final is not None
        return self.final

    def failed(self, err: APIError) -> dict[str, Any]:
        """The ``error`` event for a failure mid-stream, ``response.failed`` after it."""
        error = self._event("error", code=err.code, message=err.message, param=err.param)
        seq = self.seq
        self._close("incomplete")  # the open item as it stands (its events are not sent)
        self.seq = seq
        self.status = "failed"
        self.error = {"code": "server_error", "message": err.message}
        error["_then"] = self._event("response.failed", response=self.response())
        return error


def _browser_action(event: Any) -> dict[str, Any]:
    """A browser call's action from its arguments (the tool's own report replaces it)."""
    import json

    try:
        args = json.loads(event.call.arguments or "{}")
    except (ValueError, AttributeError):
        args = {}
    args = args if isinstance(args, dict) else {}
    action = event.recipient.removeprefix("browser.")
    if action == "search":
        return {"type": "search", "query": str(args.get("query", ""))}
    if action == "find":
        return {"type": "find", "pattern": str(args.get("pattern", "")), "url": ""}
    url = args.get("id") if isinstance(args.get("id"), str) else None
    return {"type": "open_page", "url": url}


def _action(action: dict[str, Any], sources: Any, with_sources: bool) -> dict[str, Any]:
    """A browser action in OpenAI's shapes (``find`` is ``find_in_page``; a search's
    ``sources`` only when ``include`` asks for them)."""
    out = dict(action)
    if out.get("type") == "find":
        out["type"] = "find_in_page"
        out["url"] = out.get("url") or ""
    if out.get("type") == "search":
        out.pop("sources", None)
        if with_sources and sources:
            out["sources"] = [{"type": "url", "url": s["url"]} for s in sources if "url" in s]
    return out


# -- stored responses ---------------------------------------------------------------------------


def _store(service: ResponsesService) -> ResponseStore:
    if service.store is None:
        raise APIError(404, "this server keeps no responses (--no-store)", type="not_found_error")
    return service.store


def _missing(response_id: str) -> APIError:
    return APIError(
        404,
        f"no response with id {response_id!r}",
        type="invalid_request_error",
        param="response_id",
        code="not_found",
    )


async def get_response(response_id: str, service: ResponsesService) -> dict[str, Any]:
    """``GET /v1/responses/{id}``."""
    found = await asyncio.to_thread(_store(service).get, response_id)
    if found is None:
        raise _missing(response_id)
    return found


async def delete_response(response_id: str, service: ResponsesService) -> dict[str, Any]:
    """``DELETE /v1/responses/{id}``."""
    if not await asyncio.to_thread(_store(service).delete, response_id):
        raise _missing(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be an integer from 1 to 100", param="limit")
    return limit


async def list_input_items(http: HTTPRequest, service: ResponsesService) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items`` (``limit``, ``order``, ``after``)."""
    response_id = http.path_params["response_id"]
    query = http.query_params
    limit = _limit(query.get("limit"))
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    for value in query.getlist("include"):
        if value not in INCLUDES:
            raise APIError(400, f"include has unknown value {value!r}", param="include")
    items = await asyncio.to_thread(_store(service).input_items, response_id)
    if items is None:
        raise _missing(response_id)
    if order == "desc":
        items = items[::-1]
    after = query.get("after")
    if after is not None:
        at = next((i for i, it in enumerate(items) if it["id"] == after), None)
        if at is None:
            raise APIError(400, f"after: no input item {after!r} in this response", param="after")
        items = items[at + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }
