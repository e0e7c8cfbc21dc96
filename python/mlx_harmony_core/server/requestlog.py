"""One log record per finished HTTP request (logger ``mlx_harmony_core.server.requests``,
level INFO), and ``serve --log-format json``'s formatter.

:class:`RequestLog` (ASGI) opens a :class:`RequestRecord` for each request and makes it the
current one (a context variable) while the app answers; the engine-client seam
(:class:`~.metrics.MeteredClient`) adds each finished generation's ``Completion`` to the
current record, so the line has the tokens, TTFT and finish reason next to the endpoint,
status and client address. The record's id is the ``X-Request-Id`` the client sent, or a
new one; the answer carries it back in ``X-Request-Id``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CURRENT",
    "JSONFormatter",
    "RequestLog",
    "RequestRecord",
    "endpoint_of",
    "use_json_logs",
]

LOGGER_NAME = "mlx_harmony_core.server.requests"
logger = logging.getLogger(LOGGER_NAME)

# The routes' templates (labels must not grow with ids in paths).
_STATIC = {
    "/health", "/metrics", "/tokenize", "/detokenize", "/v1/models", "/v1/chat/completions",
    "/v1/completions", "/v1/responses", "/", "/openapi.json",
}  # fmt: skip


def endpoint_of(path: str) -> str:
    """The route template a request path belongs to (``other`` for unknown paths)."""
    if path in _STATIC:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    if path.startswith("/v1/responses/"):
        if path.endswith("/input_items"):
            return "/v1/responses/{response_id}/input_items"
        return "/v1/responses/{response_id}"
    return "other"


_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@dataclass
class RequestRecord:
    """What one HTTP request did (filled in while it is answered)."""

    id: str
    method: str
    endpoint: str
    client: str
    model: str | None = None
    status: int = 500
    start: float = field(default_factory=time.perf_counter)
    completions: list[Any] = field(default_factory=list)

    def add(self, completion: Any) -> None:
        """A generation of this request finished (called on the generation thread)."""
        self.completions.append(completion)

    def fields(self) -> dict[str, Any]:
        """The record as the log line's fields (token counts summed over its generations)."""
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "endpoint": self.endpoint,
            "method": self.method,
            "status": self.status,
            "client": self.client,
            "duration_s": round(time.perf_counter() - self.start, 6),
        }
        done = list(self.completions)
        if done:
            out["prompt_tokens"] = sum(c.usage.prompt_tokens for c in done)
            out["cached_tokens"] = sum(c.usage.cached_prompt_tokens for c in done)
            out["generated_tokens"] = sum(c.usage.completion_tokens for c in done)
            out["ttft_s"] = round(min(c.timings.ttft_s for c in done), 6)
            reasons = dict.fromkeys(c.finish_reason for c in done)
            out["finish_reason"] = ",".join(r for r in reasons if r)
        return out


# The record of the request being answered (None outside one).
CURRENT: ContextVar[RequestRecord | None] = ContextVar("mhc_request_record", default=None)


def _text(f: dict[str, Any]) -> str:
    """A record's plain-text line."""
    line = f"{f['id']} {f['method']} {f['endpoint']} {f['status']} {f['duration_s']:.3f}s"
    if "generated_tokens" in f:
        line += (
            f" prompt={f['prompt_tokens']} cached={f['cached_tokens']}"
            f" generated={f['generated_tokens']} ttft={f['ttft_s']:.3f}s"
            f" finish={f['finish_reason']}"
        )
    return line + f" client={f['client']}"


class RequestLog:
    """ASGI middleware: a :class:`RequestRecord` per HTTP request, logged when its answer is
    over (a stream when it ends)."""

    def __init__(self, app: Any, model_name: str) -> None:
        self.app, self.model_name = app, model_name

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope.get("headers") or [] if k == b"x-request-id"), b"")
        rid = given.decode("latin-1")
        if not _ID.fullmatch(rid):
            rid = "req_" + uuid.uuid4().hex
        peer = scope.get("client") or ("?", 0)
        record = RequestRecord(
            rid, scope["method"], endpoint_of(scope["path"]), f"{peer[0]}:{peer[1]}"
        )

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = CURRENT.set(record)
        try:
            await self.app(scope, receive, sending)
        finally:
            CURRENT.reset(token)
            if record.completions and record.model is None:
                record.model = self.model_name
            fields = record.fields()
            logger.info("%s", _text(fields), extra={"request": fields})


class JSONFormatter(logging.Formatter):
    """Each log record as one JSON object: time, level, logger, message, and a request
    record's fields where it has them."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            out["event"] = "request"
            out.update(request)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def use_json_logs() -> None:
    """Format every log record as JSON (the root logger's handlers; a stderr handler if it
    has none) and log each finished request (INFO)."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(JSONFormatter())
    logger.setLevel(logging.INFO)
