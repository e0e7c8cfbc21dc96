"""``POST /v1/chat/completions``: messages rendered by the model's chat format."""

from __future__ import annotations

from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from .choices import Choices, seeded
from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError, ChatRequest
from .serving import check_model, read_body, respond, speculation
from .writers import ChatWriter


async def chat_completion(http: HTTPRequest, client: EngineClient, opts: ServerOptions) -> Response:
    """Parse and check a chat request, then answer it (a body or a chunk stream)."""
    req: ChatRequest = await read_body(ChatRequest, http)
    req.checks(opts.max_tokens_limit)
    check_model(req.model, opts)
    params, stops = req.params(), req.stops()
    max_tokens = req.max_completion_tokens or req.max_tokens or opts.default_max_tokens
    render: dict[str, Any] = {"reasoning_effort": req.effort()}
    if req.tools:
        render["tools"] = req.tools
        render["tool_choice"] = req.tool_choice
    elif req.tool_choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    for i, name in enumerate(req.builtin_tools or []):  # enabled twice: server and request
        if name not in opts.tools:
            on = ", ".join(opts.tools) or "none"
            raise APIError(
                400,
                f"builtin_tools[{i}] is {name!r}, which this server does not run (enabled: "
                f"{on}; start it with serve --tools {name})",
                param=f"builtin_tools[{i}]",
            )
    if req.builtin_tools:
        render["builtin_tools"] = list(dict.fromkeys(req.builtin_tools))
        render["max_tool_calls"] = opts.max_tool_calls
    top = req.top_logprobs if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    budget = req.max_reasoning_tokens
    if budget is None:
        budget = opts.max_reasoning_tokens

    def build() -> list[Any]:
        # One engine request per choice (``n``), seeded ``seed + i``: rows of one batch.
        return [
            client.request(
                req.messages,
                seeded(params, i),
                max_tokens=max_tokens,
                stop=stops,
                logprobs=top if req.logprobs else None,
                response_format=req.response_format,
                max_reasoning_tokens=budget,
                **speculation(opts),
                **render,
            )
            for i in range(req.n)
        ]

    return await respond(http, Choices(client), build, ChatWriter(req, opts, client))
