"""The built-in tools' loop: a reply that calls ``python`` or ``browser.*`` goes on after
the tool's answer, as one reply.

GPT-OSS calls its built-in tools on the analysis channel (``to=python``,
``to=browser.search``) and ends that message with ``<|call|>``. With ``builtin_tools``
asked for, each such ending is not the reply's end: the row leaves the batch (its KV cache
held for it, out of the shared prefix cache's reach), the tool runs on a small worker pool
(never on the generation thread), Harmony's tool message (author = the tool, recipient
``assistant``, the call's channel) is appended to the tokens the row already holds, and the
continuation rejoins the scheduler from that cache: only the tool message is prefilled.
At most ``max_tool_calls`` calls run per reply; later ones are answered with an error
message to the model. Function tools (``functions.*``) still end the reply, as without
the loop. (A request whose reply is constrained, by ``response_format`` or strict function
tools, has a grammar that leaves no room for a built-in call.)

The front ends see one stream: the legs' deltas (a built-in call's text with
``kind == BUILTIN_CALL``), a :class:`ToolEvent` when a call starts running and one when it
is done, and one completion whose usage adds up every leg (``prompt_tokens`` counts each
leg's prompt, ``cached_prompt_tokens`` what each found in its cache: their difference is
what was prefilled), whose ``tokens`` are everything after the first prompt (tool messages
included) and whose ``builtin_calls`` list the calls that ran.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .errors import InvalidRequestError
from .prefix_cache import PrefixCache
from .request import Completion, Request, StreamEvent, Timings, Usage
from .scheduler import END, Handle, Sink

if TYPE_CHECKING:
    from .engine import Engine

logger = logging.getLogger(__name__)

BUILTIN_CALL = "builtin_call"  # StreamEvent.kind of a built-in tool call's text and events
TOOL_WORKERS = 4  # tool calls running at once (each blocks a worker up to its timeout)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(TOOL_WORKERS, thread_name_prefix="mhc-tool")
        return _pool


def is_builtin(recipient: str | None) -> bool:
    """Whether ``recipient`` names a built-in tool (``python``, ``browser.*``)."""
    return bool(recipient) and (recipient == "python" or recipient.startswith("browser."))  # type: ignore[union-attr]


@dataclass
class BuiltinCall:
    """One built-in tool call of a reply: its id (``ci_...`` for python, ``ws_...`` for the
    browser), the call and, once it ran, the tool's result."""

    id: str
    call: Any  # tools.builtin.ToolCall
    result: Any = None  # tools.builtin.ToolResult
    channel: str = "analysis"


@dataclass
class ToolEvent(StreamEvent):
    """A built-in call starting (``phase="running"``, no result yet) or done
    (``phase="done"``, with ``result``); ``kind`` is :data:`BUILTIN_CALL`, ``delta`` empty,
    ``recipient`` the tool (``python``, ``browser.search``...), ``call_id`` its id."""

    phase: str = "running"
    call: Any = None
    result: Any = None
    builtin: BuiltinCall | None = field(default=None, repr=False)


class ToolLoopHandle(Handle):
    """The handle of a reply with built-in tools: the same members as
    :class:`~.scheduler.Handle`, over every leg of the reply."""

    def __init__(self, request: Request, sink: Sink | None, loop: ToolLoop) -> None:
        super().__init__(request, sink)
        self._loop = loop

    def cancel(self) -> None:
        """Stop the reply: at its next token, or at once while a tool runs."""
        super().cancel()
        self._loop.cancelled()


class ToolLoop:
    """Drives one reply through its built-in tool calls (see the module's docs).

    ``tools`` maps a tool name (``python``, ``browser``) to the
    :class:`~mlx_harmony_core.tools.builtin.BuiltinTools` that runs it; ``session`` keys
    their state (``None``: one session for this reply, ended with it).
    """

    def __init__(
        self,
        engine: Engine,
        request: Request,
        tools: dict[str, Any],
        *,
        max_tool_calls: int,
        session: str | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.engine = engine
        self.first = request
        self.tools = tools
        self.max_tool_calls = max_tool_calls
        self.own_session = session is None
        self.session = session or f"reply_{uuid.uuid4().hex}"
        self.handle = ToolLoopHandle(request, sink, self)
        self.legs: list[Completion] = []
        self.calls: list[BuiltinCall] = []
        self.leg: Request = request
        self.leg_call: BuiltinCall | None = None  # this leg's built-in call (its text so far)
        self._lock = threading.Lock()
        self._running = False  # a tool runs: cancelling ends the reply at once
        self._ended = False
        self._held: tuple[list[int], list[Any]] | None = None
        self._caller_stop = request.should_stop

    # -- legs ----------------------------------------------------------------------------
    def start(self) -> ToolLoopHandle:
        """Submit the first leg; returns the reply's handle."""
        self._submit(self.first)
        return self.handle

    def _submit(self, req: Request) -> None:
        own = self._caller_stop

        def should_stop() -> bool:
            return self.handle.cancelled or (own is not None and own())

        req.should_stop = should_stop
        req.hold_cache = self._hold
        self.leg, self.leg_call = req, None
        self.engine.batching().submit(req, sink=self._on_leg)

    def _hold(self, tokens: list[int], cache: list[Any]) -> bool:
        """The scheduler retires a leg (generation thread): keep its cache when the reply
        goes on with a tool call, so that the shared prefix cache cannot evict it."""
        if self._pending_call(self.leg) is None or self.handle.cancelled:
            return False
        mx.eval([c.state for c in cache])  # it may be handed out from another thread
        self._held = (list(tokens), cache)
        return True

    def _take(self, prompt: Sequence[int]) -> tuple[list[Any], int]:
        """The continuation's cache: the held one (rewound to what ``prompt`` shares with
        it), else whatever the prefix cache has."""
        held, self._held = self._held, None
        if held is not None:
            one = PrefixCache(None, 1)
            one.put(*held)
            cache, n = one.take(list(prompt))
            if cache is not None:
                return cache, n
        return self.engine.runner.take(prompt)

    def _pending_call(self, req: Request) -> tuple[str, str, str] | None:
        last_call = getattr(req.parser, "last_call", None)
        if req.finish != "tool_calls" or not req.generated or last_call is None:
            return None
        if self.engine.chat_format.finish_reason(req.generated[-1]) != "tool_calls":
            return None
        call = last_call()
        return call if call is not None and is_builtin(call[0]) else None

    def _on_leg(self, item: Any) -> None:
        """A leg's sink (generation thread): deltas go out, the end starts the tool."""
        if item is END:
            self._leg_ended()
            return
        if isinstance(item, BaseException):
            self._end(error=item)
            return
        if item.completion is not None:
            self.legs.append(item.completion)
            return
        if is_builtin(item.recipient):
            if self.leg_call is None:
                prefix = "ci" if item.recipient == "python" else "ws"
                self.leg_call = BuiltinCall(
                    f"{prefix}_{uuid.uuid4().hex}", None, channel=item.channel
                )
            item.kind, item.call_id = BUILTIN_CALL, self.leg_call.id
        self.handle._emit(item)

    def _leg_ended(self) -> None:
        if self._ended:  # the leg failed (its error ended the reply)
            return
        leg = self.leg
        call = self._pending_call(leg)
        if call is None or self.handle.cancelled or not self.legs:
            self._end()
            return
        recipient, channel, text = call
        if self.leg_call is None:  # a call with empty arguments streams no delta
            prefix = "ci" if recipient == "python" else "ws"
            self.leg_call = BuiltinCall(f"{prefix}_{uuid.uuid4().hex}", None, channel=channel)
        record = self.leg_call
        record.call = _tool_call(recipient, text, self.session)
        record.channel = channel
        self.calls.append(record)
        with self._lock:
            self._running = True
        self.handle._emit(
            ToolEvent(
                channel,
                "",
                recipient,
                kind=BUILTIN_CALL,
                call_id=record.id,
                phase="running",
                call=record.call,
                builtin=record,
            )
        )
        _workers().submit(self._run_tool, record)

    # -- a tool call (worker thread) -------------------------------------------------------
    def _run_tool(self, record: BuiltinCall) -> None:
        try:
            record.result = self._execute(record)
            with self._lock:
                self._running = False
                if self._ended:  # cancelled while it ran: the reply has ended already
                    return
            self.handle._emit(
                ToolEvent(
                    record.channel,
                    "",
                    record.call.recipient,
                    kind=BUILTIN_CALL,
                    call_id=record.id,
                    phase="done",
                    call=record.call,
                    result=record.result,
                    builtin=record,
                )
            )
            self._continue(record)
        except Exception as exc:  # a bug of ours: this reply fails, nothing else
            logger.exception("the built-in tool loop failed")
            self._end(error=exc)

    def _execute(self, record: BuiltinCall) -> Any:
        call = record.call
        n = len(self.calls)
        name = call.recipient.split(".", 1)[0]
        tools = self.tools.get(name)
        t0 = time.perf_counter()
        if n > self.max_tool_calls:
            result = _result(
                call,
                f"error: not run: this reply has reached its limit of {self.max_tool_calls} "
                "tool calls (max_tool_calls); answer with what you have",
                "failed",
            )
        elif tools is None or not tools.handles(call.recipient):
            enabled = ", ".join(sorted(self.tools)) or "none"
            result = _result(
                call,
                f"error: there is no tool {call.recipient!r} here (enabled: {enabled})",
                "failed",
            )
        else:
            try:
                result = tools.run(call)
            except Exception as exc:  # run() never raises; a failure is the model's to read
                logger.exception("built-in tool %s raised", call.recipient)
                result = _result(call, f"error: the tool failed: {exc}", "failed")
        logger.info(
            "tool call %s %s (%s, session %s): %s in %.2f s, %d chars back",
            record.id,
            call.recipient,
            _preview(call.arguments),
            self.session,
            result.status,
            getattr(result, "duration_s", 0.0) or time.perf_counter() - t0,
            len(result.text),
        )
        return result

    def _continue(self, record: BuiltinCall) -> None:
        """The next leg: this leg's prompt and reply, the tool's message, the primer."""
        leg = self.leg
        fmt = self.engine.chat_format
        tokens = [*leg.prompt_ids, *leg.generated]
        tokens += _tool_message(
            fmt, record.call.recipient, record.channel, record.result.text
        ) + fmt.encode("<|start|>assistant")
        spent = sum(c.usage.completion_tokens for c in self.legs)
        left = self.first.max_tokens - spent
        if left < 1 or self.handle.cancelled:
            self._end()
            return
        params = leg.sampler.params
        if params.seed is not None:  # each leg draws its own keys (draw indices restart)
            params = params.model_copy(update={"seed": params.seed + 7919 * len(self.legs)})
        budget = self.first.options.max_reasoning_tokens
        if budget is not None:  # the reply's reasoning budget, not each leg's
            budget = max(0, budget - sum(c.usage.reasoning_tokens for c in self.legs))
        options = leg.options.model_copy(
            update={
                "max_tokens": left,
                "max_reasoning_tokens": budget,
                "builtin_tools": None,
                "tool_choice": None,
                "truncate": False,
                "should_stop": None,
            }
        )
        try:
            nxt = self.engine.request(tokens, params, options)
        except InvalidRequestError as exc:  # the context window is full: the reply ends
            logger.info("the reply cannot go on after its tool call: %s", exc)
            self._end()
            return
        nxt.take_cache = self._take
        with self._lock:
            if self._ended:
                return
        self._submit(nxt)

    # -- the end -----------------------------------------------------------------------------
    def cancelled(self) -> None:
        """The caller cancelled: while a tool runs, the reply ends now (the tool's result is
        dropped when it comes); while decoding, the leg ends at its next token."""
        with self._lock:
            running = self._running
        if running:
            self._end()

    def _end(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        held, self._held = self._held, None
        if held is not None and error is None:
            self.engine.runner.keep(*held)  # evaluated when held
        try:
            if error is not None:
                self.handle._emit(error)
            else:
                completion = self._merged()
                self.handle._emit(
                    StreamEvent(finish_reason=completion.finish_reason, completion=completion)
                )
        finally:
            if self.own_session:
                for tools in self.tools.values():
                    try:
                        tools.end_session(self.session)
                    except Exception:
                        logger.debug("ending a tool session failed", exc_info=True)
            self.handle._emit(END)

    def _merged(self) -> Completion:
        """One completion for every leg (see the module's docs)."""
        legs = self.legs
        if not legs:  # cancelled before anything was decoded
            legs = [_empty()]
        last = legs[-1]
        finish = last.finish_reason
        if self.handle.cancelled:
            finish = "cancelled"
        usage = Usage()
        for c in legs:
            for name in vars(usage):
                setattr(usage, name, getattr(usage, name) + getattr(c.usage, name))
        t_end = time.perf_counter()
        decode_s = sum(c.timings.decode_s for c in legs)
        first = legs[0].timings
        timings = Timings(
            ttft_s=first.ttft_s,
            prefill_tokens_per_s=first.prefill_tokens_per_s,
            decode_s=decode_s,
            decode_tokens_per_s=usage.completion_tokens / decode_s if decode_s > 0 else 0.0,
            total_s=t_end - self.first.t0,
            peak_memory_bytes=max(c.timings.peak_memory_bytes for c in legs),
        )
        tokens = [*self.leg.prompt_ids[len(self.first.prompt_ids) :], *last.tokens]
        if self.leg is self.first:
            tokens = list(last.tokens)
        logprobs = None
        if all(c.logprobs is not None for c in legs):
            logprobs = [lp for c in legs for lp in c.logprobs or []]
        content_lps = None
        if all(c.content_logprobs is not None for c in legs):
            content_lps = [lp for c in legs for lp in c.content_logprobs or []]
        text = "".join(c.text for c in legs)
        cited = self._cite(text)
        out = Completion(
            text=text,
            reasoning="".join(c.reasoning for c in legs),
            tool_calls=[call for c in legs for call in c.tool_calls],
            finish_reason=finish,
            usage=usage,
            timings=timings,
            tokens=tokens,
            logprobs=logprobs,
            stop_sequence=last.stop_sequence,
            content_logprobs=content_lps,
            builtin_calls=list(self.calls),
            cited=cited,
        )
        return out

    def _cite(self, text: str) -> tuple[str, list[dict[str, Any]]] | None:
        browser = self.tools.get("browser")
        if browser is None or not text or not self.calls:
            return None
        try:
            cited, annotations = browser.annotate(self.session, text)
        except Exception:
            logger.debug("resolving citations failed", exc_info=True)
            return None
        return (cited, list(annotations)) if annotations or cited != text else None


def _tool_call(recipient: str, arguments: str, session: str) -> Any:
    from .tools.builtin import ToolCall

    return ToolCall(recipient=recipient, arguments=arguments, session=session)


def _result(call: Any, text: str, status: str) -> Any:
    from .tools.builtin import ToolResult

    return ToolResult(author=call.recipient, text=text, status=status, duration_s=0.0, details={})


def _tool_message(fmt: Any, recipient: str, channel: str, text: str) -> list[int]:
    """Harmony's tool message: ``<|start|>{tool} to=assistant<|channel|>{channel}
    <|message|>{text}<|end|>`` (as OpenAI's reference tools write it)."""
    from openai_harmony import Author, Message, Role

    msg = Message.from_author_and_content(Author.new(Role.TOOL, recipient), text)
    msg = msg.with_recipient("assistant").with_channel(channel)
    return list(fmt.encoding.render(msg))


def _preview(text: str, n: int = 80) -> str:
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def _empty() -> Completion:
    return Completion("", "", [], "cancelled", Usage(), Timings())


def builtin_system(tools: Sequence[Any]) -> Callable[[Any], Any]:
    """The system message's hook that declares ``tools`` (each a ``BuiltinTools``)."""

    def apply(system: Any) -> Any:
        for t in tools:
            system = t.system_content(system)
        return system

    return apply
