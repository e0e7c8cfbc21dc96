"""``POST /v1/completions``: a raw prompt (text or token ids), no chat template."""

from __future__ import annotations

from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from ..messages import check_text
from .choices import Choices, seeded
from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError, CompletionRequest
from .serving import check_model, read_body, respond, speculation
from .writers import TextWriter


async def completion(http: HTTPRequest, client: EngineClient, opts: ServerOptions) -> Response:
    """Parse and check a completion request, then answer it (a body or a chunk stream)."""
    req: CompletionRequest = await read_body(CompletionRequest, http)
    req.checks(opts.max_tokens_limit)
    check_model(req.model, opts)
    if req.echo or req.suffix or (req.best_of or 1) > 1:
        raise APIError(400, "echo, suffix and best_of > 1 are not supported")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "one prompt per request (batches: send several)", param="prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    params, stops = req.params(), req.stops()

    def build() -> list[Any]:
        # Tokenized on the preparation thread: never on the event loop.
        if isinstance(prompt, str):
            ids = client.encode(check_text(prompt, "prompt", param="prompt"))
        else:
            ids = list(prompt)
        # One engine request per choice (``n``), seeded ``seed + i``: rows of one batch.
        return [
            client.request(
                ids,
                seeded(params, i),
                max_tokens=req.max_tokens or 16,
                stop=stops,
                logprobs=req.logprobs,
                response_format=req.response_format,
                raw=True,
                **speculation(opts),
            )
            for i in range(req.n)
        ]

    return await respond(http, Choices(client), build, TextWriter(req, opts, client))
