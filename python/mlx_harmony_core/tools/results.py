"""What a built-in tool call is and what it returns (shared by the python and browser tools)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["completed", "failed", "incomplete"]


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: Harmony's recipient, the text it wrote, the conversation."""

    recipient: str  # "python", "browser.search", "browser.open", "browser.find"
    arguments: str  # code for python; JSON for browser.* (may be malformed)
    session: str  # conversation key: python variables / browser pages persist per session


@dataclass
class ToolResult:
    """The tool message the model reads next, plus what the Responses API reports."""

    author: str  # Harmony author of the tool message ("python", "browser.search", ...)
    text: str  # what the model reads next (truncated with a marker)
    status: Status  # incomplete = stopped at a limit
    duration_s: float = 0.0
    # python: {"code", "outputs": [{"type": "logs", "logs"}]};
    # browser: {"action": {...}, "sources": [{"type": "url", "url"}]}
    details: dict[str, Any] = field(default_factory=dict)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} more characters truncated ...]"
