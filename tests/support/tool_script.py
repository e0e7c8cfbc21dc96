"""Scripted Harmony replies with built-in tool calls, and stand-in tools, for the tool loop's
tests.

:class:`ScriptProcessor` is a logits processor that makes any model (the random demo model
included, with its real batched caches) write a chosen reply: the k-th reply after the k-th
``<|call|>`` of the context. :class:`FakeTools` follows the built-in tools' interface
(``tools.builtin.BuiltinTools``) without processes or network: ``python`` runs the code in
a namespace per session (so state persists across calls), ``browser.*`` serves canned pages
with the reference's line-numbered, cursor-cited text.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from mlx_harmony_core.harmony import CALL, load_encoding


def toks(text: str) -> list[int]:
    return list(load_encoding().encode(text, allowed_special="all"))


def python_call(code: str, thought: str = "Let me compute.") -> list[int]:
    """An analysis thought, then a call to python with ``code``."""
    return toks(
        f"<|channel|>analysis<|message|>{thought}<|end|><|start|>assistant"
        f"<|channel|>analysis to=python code<|message|>{code}<|call|>"
    )


def browser_call(action: str, args: dict[str, Any]) -> list[int]:
    return toks(
        f"<|channel|>analysis to=browser.{action} code<|message|>{json.dumps(args)}<|call|>"
    )


def final(text: str) -> list[int]:
    return toks(f"<|channel|>final<|message|>{text}<|return|>")


class ScriptProcessor:
    """A logits processor forcing reply ``k`` (``k`` = the ``<|call|>`` tokens in the
    context): the next token continues the longest part of the reply the context ends
    with, right after an ``<|start|>assistant``. Past a reply's end it forces its last
    token again."""

    def __init__(self, replies: Sequence[Sequence[int]], vocab: int = 201088) -> None:
        self.replies = [list(r) for r in replies]
        self.head = toks("<|start|>assistant")
        self.vocab = vocab
        self.seen: list[list[int]] = []  # the context at each reply's first token

    def next_token(self, context: list[int]) -> int:
        k = min(context.count(CALL), len(self.replies) - 1)
        script = self.replies[k]
        h = len(self.head)
        for j in range(min(len(script), len(context)), -1, -1):
            body = context[len(context) - j :] if j else []
            before = context[: len(context) - j]
            if body == script[:j] and before[-h:] == self.head:
                if j == 0:
                    self.seen.append(list(context))
                return script[j] if j < len(script) else script[-1]
        return script[-1]

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        t = self.next_token([int(x) for x in tokens.tolist()])
        return mx.where(mx.arange(logits.shape[-1]) == t, 100.0, -100.0)[None].astype(logits.dtype)


class FakeTools:
    """The built-in tools' interface, in process (tests only: nothing is sandboxed)."""

    def __init__(self, names: Sequence[str], options: Any = None, *, delay: float = 0.0) -> None:
        self.names = tuple(names)
        self.options = options
        self.delay = delay
        self.calls: list[Any] = []
        self.ended: list[str] = []
        self.closed = False
        self.running = threading.Event()
        self._ns: dict[str, dict[str, Any]] = {}
        self._pages: dict[str, list[str]] = {}

    def system_content(self, system: Any) -> Any:
        if "python" in self.names:
            system = system.with_python_tool()
        if "browser" in self.names:
            system = system.with_browser_tool()
        return system

    def handles(self, recipient: str) -> bool:
        name = recipient.split(".", 1)[0]
        return name in self.names

    def run(self, call: Any, timeout: float | None = None) -> Any:
        ToolResult = builtin().ToolResult  # noqa: N806

        self.calls.append(call)
        self.running.set()
        t0 = time.perf_counter()
        if self.delay:
            time.sleep(self.delay)
        if call.recipient == "python":
            out = io.StringIO()
            ns = self._ns.setdefault(call.session, {})
            try:
                with contextlib.redirect_stdout(out):
                    exec(call.arguments, ns)
                status = "completed"
            except Exception as exc:
                out.write(f"{type(exc).__name__}: {exc}")
                status = "failed"
            text = out.getvalue()
            details = {"code": call.arguments, "outputs": [{"type": "logs", "logs": text}]}
            return ToolResult("python", text, status, time.perf_counter() - t0, details)
        action = call.recipient.split(".", 1)[1]
        args = json.loads(call.arguments or "{}")
        pages = self._pages.setdefault(call.session, [])
        url = "http://docs.test/mlx"
        if action == "search":
            pages.append(url)
            text = f"[{len(pages) - 1}] MLX docs ({url})\nL0: MLX is an array framework."
            details = {"action": {"type": "search", "query": args.get("query", "")}, "sources": []}
        elif action == "open":
            pages.append(url)
            text = f"[{len(pages) - 1}] MLX docs ({url})\nL0: MLX runs on Apple silicon."
            details = {"action": {"type": "open_page", "url": url}, "sources": []}
        else:
            text = f"[{len(pages) - 1}] Find results\nL0: found {args.get('pattern')!r}"
            details = {"action": {"type": "find", "pattern": args.get("pattern"), "url": url}}
        return ToolResult(call.recipient, text, "completed", time.perf_counter() - t0, details)

    def annotate(self, session: str, text: str) -> tuple[str, list[dict[str, Any]]]:
        mark = "【1†L0-L0】"
        if mark not in text:
            return text, []
        start = text.index(mark)
        cited = text.replace(mark, " (docs.test)", 1)
        ann = {
            "type": "url_citation",
            "start_index": start,
            "end_index": start + len(" (docs.test)"),
            "url": "http://docs.test/mlx",
            "title": "MLX docs",
        }
        return cited, [ann]

    def end_session(self, session: str) -> None:
        self.ended.append(session)
        self._ns.pop(session, None)

    def close(self) -> None:
        self.closed = True


def builtin() -> Any:
    """``mlx_harmony_core.tools.builtin`` (ToolCall, ToolResult, BUILTIN_TOOL_NAMES, ...)."""
    from mlx_harmony_core.tools import builtin as module

    return module
