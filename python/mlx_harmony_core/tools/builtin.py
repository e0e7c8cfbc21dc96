"""GPT-OSS's built-in tools, run by the engine: ``python`` (a sandboxed notebook per
conversation) and ``browser`` (search, open, find, with line-numbered pages and citations).

The engine's tool loop calls :meth:`BuiltinTools.run` for a reply's ``to=python`` /
``to=browser.*`` message and feeds the :class:`ToolResult` back as the tool's message.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .options import BuiltinToolOptions
from .results import ToolCall, ToolResult

if TYPE_CHECKING:
    import openai_harmony

    from .browser import Browser
    from .python_sandbox import PythonSandbox

logger = logging.getLogger(__name__)

BUILTIN_TOOL_NAMES = ("python", "browser")

__all__ = ["BUILTIN_TOOL_NAMES", "BuiltinToolOptions", "BuiltinTools", "ToolCall", "ToolResult"]


def python_description(options: BuiltinToolOptions) -> str:
    """The reference's ``python`` tool description, with this sandbox's real limits."""
    from .python_sandbox import network_blocked

    internet = "disabled" if network_blocked() else "UNKNOWN"
    return (
        "Use this tool to execute Python code in your chain of thought. The code will not be "
        "shown to the user. This tool should be used for internal reasoning, but not for code "
        "that is intended to be visible to the user (e.g. when creating plots, tables, or "
        "files).\n\n"
        "When you send a message containing Python code to python, it will be executed in a "
        "stateful Jupyter notebook environment. python will respond with the output of the "
        f"execution or time out after {options.python_timeout_s:.1f} seconds. The current "
        "working directory can be used to save files for this conversation. Internet access "
        f"for this session is {internet}."
    )


class BuiltinTools:
    """The enabled built-in tools of an engine or server (thread-safe).

    ``names``: a subset of :data:`BUILTIN_TOOL_NAMES`; ``options``: every limit."""

    def __init__(self, names: Sequence[str], options: BuiltinToolOptions | None = None) -> None:
        if isinstance(names, str):
            raise TypeError('names must be a sequence of tool names, e.g. ["python", "browser"]')
        for name in names:
            if name not in BUILTIN_TOOL_NAMES:
                close = difflib.get_close_matches(str(name), BUILTIN_TOOL_NAMES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"unknown built-in tool {name!r}{hint} (choose from {', '.join(BUILTIN_TOOL_NAMES)})"
                )
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.options = options if options is not None else BuiltinToolOptions()
        self._python: PythonSandbox | None = None
        self._browser: Browser | None = None
        if "python" in self.names:
            from .python_sandbox import PythonSandbox

            self._python = PythonSandbox(self.options)
        if "browser" in self.names:
            from .browser import Browser

            self._browser = Browser(self.options)

    def system_content(self, content: openai_harmony.SystemContent) -> openai_harmony.SystemContent:
        """``content`` with the enabled tools declared (Harmony's ``python`` / ``browser``
        namespaces with the reference's descriptions)."""
        from openai_harmony import ToolNamespaceConfig

        if self._browser is not None:
            content = content.with_tools(self._browser.namespace())
        if self._python is not None:
            content = content.with_tools(
                ToolNamespaceConfig(
                    name="python", description=python_description(self.options), tools=[]
                )
            )
        return content

    def handles(self, recipient: str) -> bool:
        """True when ``recipient`` (Harmony's, e.g. ``browser.search``) is an enabled tool."""
        if recipient == "python":
            return self._python is not None
        return self._browser is not None and recipient.startswith("browser.")

    def run(self, call: ToolCall, timeout: float | None = None) -> ToolResult:
        """Run one call (blocking). Never raises: errors become a message to the model."""
        t0 = time.monotonic()
        try:
            if call.recipient == "python" and self._python is not None:
                result = self._python.run(call.arguments, call.session, timeout)
            elif call.recipient.startswith("browser.") and self._browser is not None:
                result = self._browser.run(call, timeout)
            else:
                enabled = ", ".join(self.names) or "none"
                result = ToolResult(
                    call.recipient,
                    f"Unknown tool `{call.recipient}`: the built-in tools enabled are {enabled}.",
                    "failed",
                )
        except Exception as exc:  # noqa: BLE001 - a tool bug must not end the reply
            logger.exception("built-in tool %s failed", call.recipient)
            result = ToolResult(call.recipient, f"The tool failed: {exc}", "failed")
        result.duration_s = time.monotonic() - t0
        logger.info(
            "tool call %s session=%s status=%s %.3fs args=%r -> %d chars",
            call.recipient,
            call.session,
            result.status,
            result.duration_s,
            call.arguments[:200],
            len(result.text),
        )
        return result

    def annotate(self, session: str, text: str) -> tuple[str, list[dict[str, Any]]]:
        """The final answer with its ``【cursor†Lstart-Lend】`` citations replaced as the
        reference does (`` ([domain](url)) ``) and the Responses ``url_citation`` annotations."""
        if self._browser is None:
            return text, []
        return self._browser.annotate(session, text)

    def end_session(self, session: str) -> None:
        """Forget a conversation: its python process and browser pages."""
        if self._python is not None:
            self._python.end_session(session)
        if self._browser is not None:
            self._browser.end_session(session)

    def close(self) -> None:
        """Kill every sandbox process (idempotent)."""
        if self._python is not None:
            self._python.close()
        if self._browser is not None:
            self._browser.close()

    def __enter__(self) -> BuiltinTools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
