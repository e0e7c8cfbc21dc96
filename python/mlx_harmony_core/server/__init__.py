"""OpenAI-compatible HTTP server: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``, ``/health`` and the chat page at ``/``.

The server sees the engine through an :class:`EngineClient` (build a request, submit it
with a sink, encode, limits); for an :class:`~mlx_harmony_core.Engine` that is a
:class:`LocalClient`, whose requests decode together on the engine's continuous-batching
scheduler (up to ``--max-batch`` rows, ``--max-queue`` waiting, later ones a 503 with
``Retry-After``). Events cross from the generation thread to the event loop through an
asyncio queue; a client that disconnects cancels its request at the next token.

Modules: :mod:`.options` (:class:`ServerOptions`, also the ``serve`` flags),
:mod:`.protocol` (request models, errors), :mod:`.guards` (ASGI guards), :mod:`.client`
(the engine seam), :mod:`.serving` (submit and answer), one module per endpoint
(:mod:`.chat_completions`, :mod:`.completions`, :mod:`.models`), :mod:`.writers` (SSE
framing for chat chunks and typed events; the response objects) and :mod:`.app` (routes,
startup, signals).
"""

from .app import bind, create_app, serve
from .client import END, EngineClient, LocalClient
from .guards import BodyGuard, KeyGuard, LocalGuard
from .options import Flag, ServerOptions
from .protocol import (
    IGNORED_FIELDS,
    OPENAI_LIMITS,
    APIError,
    ChatRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    api_limits,
    as_api_error,
    parse_body,
)
from .serving import Job
from .writers import CHUNKS, TYPED_EVENTS, ChatWriter, SSEFraming, StreamWriter, TextWriter

__all__ = [
    "CHUNKS",
    "END",
    "IGNORED_FIELDS",
    "OPENAI_LIMITS",
    "TYPED_EVENTS",
    "APIError",
    "BodyGuard",
    "ChatRequest",
    "ChatWriter",
    "CompletionRequest",
    "EngineClient",
    "ErrorBody",
    "ErrorResponse",
    "Flag",
    "Job",
    "KeyGuard",
    "LocalClient",
    "LocalGuard",
    "SSEFraming",
    "ServerOptions",
    "StreamWriter",
    "TextWriter",
    "api_limits",
    "as_api_error",
    "bind",
    "create_app",
    "parse_body",
    "serve",
]
