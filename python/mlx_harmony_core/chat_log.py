"""Chat logs: a conversation and how each reply was made, as versioned JSON."""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._paths import atomic_write_text, home

FORMAT = "mlx-harmony-core-chat"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ChatLogError(ValueError):
    """A chat log that cannot be read; the file is left untouched."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class LoggedToolCall(BaseModel):
    """A function call the assistant made."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    arguments: str


class LoggedBuiltinCall(BaseModel):
    """A built-in tool call the engine ran during a reply (python, browser.*), and what
    the tool answered."""

    model_config = ConfigDict(extra="forbid")

    id: str
    recipient: str
    arguments: str
    status: str
    output: str
    duration_s: float = 0.0


class LoggedMessage(BaseModel):
    """One message; assistant turns also record how they were generated."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    timestamp: str = Field(default_factory=_now)
    channel: str | None = None
    reasoning: str | None = None
    tool_calls: list[LoggedToolCall] | None = None
    # Built-in tool calls of this reply (part of its reasoning: not sent back to the model).
    builtin_calls: list[LoggedBuiltinCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # assistant turns: what made them
    model: str | None = None
    params: dict[str, Any] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    timings: dict[str, float] | None = None

    def to_chat(self) -> dict[str, Any]:
        """The message as the engine takes it (OpenAI-style dict)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning:
            out["reasoning"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


class ChatLog(BaseModel):
    """A saved conversation: ``format``/``version`` header, settings, messages."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mlx-harmony-core-chat"] = FORMAT
    version: int = VERSION
    id: str = Field(
        default_factory=lambda: uuid.uuid4().hex,
        description="which conversation this is: a save never replaces another's file",
    )
    created: str = Field(default_factory=_now)
    updated: str = Field(default_factory=_now)
    model: str | None = None
    profile: str | None = None
    settings: dict[str, Any] = Field(
        default_factory=dict, description="overrides of the prompt config (\\set, flags)"
    )
    messages: list[LoggedMessage] = Field(default_factory=list)

    # -- building ------------------------------------------------------------------------
    def add_user(self, content: str) -> LoggedMessage:
        msg = LoggedMessage(role="user", content=content)
        self.messages.append(msg)
        return msg

    def add_assistant(self, completion: Any, *, model: str | None, params: Any) -> LoggedMessage:
        """Record a :class:`Completion` (its text, reasoning, calls, usage and timings)."""
        usage = {**vars(completion.usage), "total_tokens": completion.usage.total_tokens}
        msg = LoggedMessage(
            role="assistant",
            content=completion.text,
            channel="final",
            reasoning=completion.reasoning or None,
            tool_calls=[LoggedToolCall(**vars(c)) for c in completion.tool_calls] or None,
            builtin_calls=[
                LoggedBuiltinCall(
                    id=b.id,
                    recipient=b.call.recipient,
                    arguments=b.call.arguments,
                    status=b.result.status if b.result is not None else "incomplete",
                    output=b.result.text if b.result is not None else "",
                    duration_s=getattr(b.result, "duration_s", 0.0) or 0.0,
                )
                for b in getattr(completion, "builtin_calls", None) or []
            ]
            or None,
            model=model,
            params=params.model_dump(exclude_defaults=True) if params is not None else None,
            finish_reason=completion.finish_reason,
            usage=usage,
            timings={k: float(v) for k, v in vars(completion.timings).items()},
        )
        self.messages.append(msg)
        return msg

    def add_tool_result(self, call_id: str, name: str, content: str) -> LoggedMessage:
        msg = LoggedMessage(role="tool", content=content, tool_call_id=call_id, name=name)
        self.messages.append(msg)
        return msg

    def chat_messages(self) -> list[dict[str, Any]]:
        """The conversation for :meth:`Engine.stream`."""
        return [m.to_chat() for m in self.messages]

    # -- files ---------------------------------------------------------------------------
    def check_target(self, path: str | os.PathLike[str]) -> None:
        """Raise :class:`ChatLogError` unless ``path`` is free or holds this conversation:
        saving never replaces a foreign file or another chat."""
        path = Path(path)
        if not path.exists():
            return
        if path.is_dir():
            raise ChatLogError(f"{path} is a directory; give a file name")
        try:
            other = ChatLog.load(path)
        except ChatLogError:
            raise ChatLogError(
                f"{path} exists and is not a chat log; it was left alone: choose another "
                "name (\\save NEW-NAME)"
            ) from None
        if other.id != self.id:
            raise ChatLogError(
                f"{path} holds another conversation ({len(other.messages)} messages); it was "
                "left alone: choose another name (\\save NEW-NAME)"
            )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash leaves the previous version, never half a file."""
        self.updated = _now()
        atomic_write_text(Path(path), self.model_dump_json(indent=2, exclude_none=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ChatLog:
        """Read a log; :class:`ChatLogError` says what is wrong (the file is not touched)."""
        path = Path(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ChatLogError(f"chat log {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatLogError(f"cannot read chat log {path}: {exc}") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ChatLogError(
                f"chat log {path} is corrupt (invalid JSON at line {exc.lineno}, column "
                f"{exc.colno}); it was left as is: fix or move it, or use another --chat name"
            ) from None
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ChatLogError(f"{path} is not an mlx-harmony-core chat log")
        version = data.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise ChatLogError(
                f"chat log {path} has version {version!r}; this mlx-harmony-core reads "
                f"versions up to {VERSION}: upgrade mlx-harmony-core"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ChatLogError(
                f"chat log {path} is malformed at {where}: {first['msg']} "
                f"({exc.error_count()} problem(s)); it was left as is"
            ) from None


def chat_path(name: str) -> Path:
    """Where chat ``name`` lives: a path as given (a directory gets ``chat.json`` inside),
    or ``<home>/chats/NAME.json``."""
    if os.sep in name or "/" in name or name.endswith(".json"):
        path = Path(name).expanduser()
        if name.endswith(("/", os.sep)) or path.is_dir():
            return path / "chat.json"
        return path
    if not _NAME.match(name):
        raise ValueError(
            f"chat name {name!r}: use letters, digits, '.', '_' or '-' (or give a path)"
        )
    return home() / "chats" / f"{name}.json"
