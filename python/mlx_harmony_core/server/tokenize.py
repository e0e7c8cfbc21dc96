"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes).

``/tokenize`` takes a ``prompt`` (raw text; ``add_special_tokens: false`` leaves out what the
tokenizer adds on its own, such as a start-of-text token) or ``messages`` (rendered by the
model's chat format, exactly as ``/v1/chat/completions`` renders them, ``tools`` and
``reasoning_effort`` included) and answers ``{"tokens", "count", "max_model_len"}``.
``/detokenize`` answers ``{"prompt"}`` for ``{"tokens"}``: the tokens' bytes as UTF-8
(an incomplete character as U+FFFD).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request as HTTPRequest

from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError, DetokenizeRequest, TokenizeRequest, as_api_error
from .serving import check_model, read_body


def _tokens(req: TokenizeRequest, client: EngineClient) -> list[int]:
    """The request's token ids (raises the engine's errors for a bad prompt)."""
    if req.messages is not None:
        if not req.add_generation_prompt:
            raise APIError(
                400,
                "add_generation_prompt: false is not available: the chat format always "
                "renders the prompt up to the assistant's reply",
                param="add_generation_prompt",
            )
        render = getattr(client, "render", None)
        if render is None:
            raise APIError(400, "this server cannot render messages; send a prompt")
        options: dict[str, Any] = {"reasoning_effort": req.reasoning_effort or "medium"}
        if req.tools:
            options["tools"] = req.tools
        return list(render(req.messages, **options))
    assert req.prompt is not None
    if not req.add_special_tokens:
        encode_text = getattr(client, "encode_text", None)
        if encode_text is not None:
            return list(encode_text(req.prompt))
    return list(client.encode(req.prompt))


async def tokenize(http: HTTPRequest, client: EngineClient, opts: ServerOptions) -> dict[str, Any]:
    """Answer ``POST /tokenize``."""
    req: TokenizeRequest = await read_body(TokenizeRequest, http)
    check_model(req.model, opts)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send one of prompt or messages", param="prompt")
    try:
        tokens = await asyncio.to_thread(_tokens, req, client)
    except APIError:
        raise
    except Exception as exc:
        raise as_api_error(exc) from None
    return {"tokens": tokens, "count": len(tokens), "max_model_len": client.context_length}


async def detokenize(
    http: HTTPRequest, client: EngineClient, opts: ServerOptions
) -> dict[str, Any]:
    """Answer ``POST /detokenize``; an id outside the vocabulary is a 400."""
    req: DetokenizeRequest = await read_body(DetokenizeRequest, http)
    check_model(req.model, opts)
    table = client.token_bytes()
    bad = next((t for t in req.tokens if not 0 <= t < len(table)), None)
    if bad is not None:
        raise APIError(
            400,
            f"token id {bad} is outside this model's vocabulary [0, {len(table)})",
            param="tokens",
        )
    text = b"".join(table[t] for t in req.tokens).decode("utf-8", errors="replace")
    return {"prompt": text}
