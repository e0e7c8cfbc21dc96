"""The app: routes, error handlers, the guards around it, and :func:`serve` (socket,
signals, shutdown).

Each route is a small function that takes what it needs from ``app.state`` (the engine
client, the options) and calls its endpoint's logic. Generation is the engine's:
requests decode together on its continuous-batching scheduler (one generation thread);
the event loop only parses, streams and guards. A server of several models
(:class:`~.pool.ModelPool`) holds the model a request names for that request: its own
client and options, its own scheduler and thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_completions import chat_completion
from .client import EngineClient, LocalClient
from .completions import completion
from .guards import BodyGuard, KeyGuard, LocalGuard
from .metrics import CONTENT_TYPE_LATEST, MeteredClient, MetricsGuard, ServerMetrics
from .models import get_model, health, list_models
from .options import ServerOptions
from .pool import Lease, ModelPool
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    ErrorResponse,
    ResponsesRequest,
    TokenizeRequest,
)
from .requestlog import RequestLog, use_json_logs
from .responses import (
    ResponsesService,
    create_response,
    delete_response,
    get_response,
    list_input_items,
)
from .serving import requested_model
from .tokenize import detokenize, tokenize

logger = logging.getLogger(__name__)

ERRORS = {
    400: "invalid request (bad JSON, field, value or prompt)",
    401: "missing or wrong API key",
    404: "model not served (the message lists those served)",
    413: "request body too large",
    415: "body not sent as application/json",
    503: "queue full, model cannot fit the memory budget, or shutting down (see Retry-After)",
}


def post_docs(body: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a POST whose body we parse ourselves: the request model and the errors."""
    return {
        "openapi_extra": {
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        },
        "responses": {
            code: {"model": ErrorResponse, "description": d} for code, d in ERRORS.items()
        },
    }


# -- routes: each reads the client and options from app.state ----------------------------------


async def health_route(http: HTTPRequest) -> dict[str, Any]:
    """``GET /health``."""
    state = http.app.state
    return health(state.client, state.options)


async def models_route(http: HTTPRequest) -> dict[str, Any]:
    """``GET /v1/models``."""
    state = http.app.state
    return list_models(state.client, state.options, state.started)


async def model_route(name: str, http: HTTPRequest) -> dict[str, Any]:
    """``GET /v1/models/{name}``."""
    state = http.app.state
    return get_model(name, state.client, state.options, state.started)


async def use_model(http: HTTPRequest) -> Lease:
    """The model a request's body names, held for the request: the one served, or a pool's
    (404 for a name it does not hold, 503 when it cannot be loaded now; a load in progress
    is awaited)."""
    state = http.app.state
    if state.pool is None:
        return Lease(state.client, state.options)
    return await state.pool.acquire(await requested_model(http))


def leased(
    name: str, endpoint: Callable[..., Awaitable[Any]], doc: str
) -> Callable[..., Awaitable[Any]]:
    """A POST route that holds the model its body names (:func:`use_model`) while
    ``endpoint(http, client, opts)`` runs, and lets it go however the endpoint ends."""

    async def route(http: HTTPRequest) -> Any:
        lease = await use_model(http)
        try:
            return await endpoint(http, lease.client, lease.opts)
        finally:
            lease.release()

    route.__name__ = route.__qualname__ = name  # FastAPI's operation ids come from it
    route.__doc__ = doc
    return route


async def _create_response(http: HTTPRequest, client: EngineClient, opts: Any) -> Response:
    return await create_response(http, client, opts, http.app.state.responses)


chat_route = leased("chat_route", chat_completion, "``POST /v1/chat/completions``.")
completions_route = leased("completions_route", completion, "``POST /v1/completions``.")
responses_route = leased("responses_route", _create_response, "``POST /v1/responses``.")
tokenize_route = leased("tokenize_route", tokenize, "``POST /tokenize``.")
detokenize_route = leased("detokenize_route", detokenize, "``POST /detokenize``.")


async def get_response_route(response_id: str, http: HTTPRequest) -> dict[str, Any]:
    """``GET /v1/responses/{response_id}``."""
    return await get_response(response_id, http.app.state.responses)


async def delete_response_route(response_id: str, http: HTTPRequest) -> dict[str, Any]:
    """``DELETE /v1/responses/{response_id}``."""
    return await delete_response(response_id, http.app.state.responses)


async def input_items_route(response_id: str, http: HTTPRequest) -> dict[str, Any]:
    """``GET /v1/responses/{response_id}/input_items``."""
    return await list_input_items(http, http.app.state.responses)


async def metrics_route(http: HTTPRequest) -> Response:
    """``GET /metrics``: Prometheus' text format."""
    metrics: ServerMetrics = http.app.state.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- errors: every one in OpenAI's shape ---------------------------------------------------------


async def api_error(http: HTTPRequest, exc: APIError) -> JSONResponse:
    """An :class:`APIError` raised by a route."""
    return exc.response()


async def http_error(http: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404 for a path, 405 for a method)."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    headers = dict(exc.headers or {})  # e.g. Allow on a 405
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=headers).response()


async def crash(http: HTTPRequest, exc: Exception) -> JSONResponse:
    """Anything else: a 500, logged."""
    logger.exception("request failed")
    return APIError(500, f"internal error: {exc}", type="server_error").response()


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """``/openapi.json``, with the request models we parse ourselves as components."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in (
            ChatRequest,
            CompletionRequest,
            ResponsesRequest,
            TokenizeRequest,
            DetokenizeRequest,
        ):
            js = body.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[body.__name__] = js
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(engine: Any, options: ServerOptions | None = None) -> Any:
    """The ASGI app serving ``engine`` (which it then owns: nothing else may use it).

    ``engine`` is an :class:`~mlx_harmony_core.Engine` (served on its batching scheduler,
    see :class:`LocalClient`), anything that implements :class:`EngineClient`, or a
    :class:`~.pool.ModelPool` (several models, the request's ``model`` picks one). The
    returned app has ``client`` (the engine client) and ``fastapi`` (the inner app).
    """
    opts = options or ServerOptions()
    pool = engine if isinstance(engine, ModelPool) else None
    if pool is not None:
        opts = dataclasses.replace(opts, model_name=pool.default)
        client: EngineClient = pool
    else:
        client = engine if isinstance(engine, EngineClient) else LocalClient(engine, opts)
    app = FastAPI(
        title="mlx-harmony-core", version=opts.version or "0", docs_url=None, redoc_url=None
    )
    metrics = ServerMetrics(client, opts.model_name) if opts.metrics else None
    app.state.pool = pool
    if pool is not None:  # each model's client counted, and in the request log
        pool.wrap = lambda name, c: MeteredClient(c, metrics, name)
        app.state.client = pool
    else:
        app.state.client = MeteredClient(client, metrics)  # counted, and in the request log
    app.state.metrics = metrics
    app.state.options = opts
    app.state.started = int(time.time())
    app.add_exception_handler(APIError, api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, crash)
    app.add_api_route("/health", health_route, methods=["GET"])
    app.add_api_route("/v1/models", models_route, methods=["GET"])
    if metrics is not None:
        app.add_api_route("/metrics", metrics_route, methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models/{name:path}", model_route, methods=["GET"])
    app.add_api_route(
        "/v1/chat/completions", chat_route, methods=["POST"], **post_docs(ChatRequest)
    )
    app.add_api_route(
        "/v1/completions", completions_route, methods=["POST"], **post_docs(CompletionRequest)
    )
    app.add_api_route("/tokenize", tokenize_route, methods=["POST"], **post_docs(TokenizeRequest))
    app.add_api_route(
        "/detokenize", detokenize_route, methods=["POST"], **post_docs(DetokenizeRequest)
    )
    app.state.responses = ResponsesService.open(opts)
    app.add_api_route(
        "/v1/responses", responses_route, methods=["POST"], **post_docs(ResponsesRequest)
    )
    app.add_api_route(
        "/v1/responses/{response_id}",
        get_response_route,
        methods=["GET"],
        responses={404: {"model": ErrorResponse, "description": "no such stored response"}},
    )
    app.add_api_route(
        "/v1/responses/{response_id}",
        delete_response_route,
        methods=["DELETE"],
        responses={404: {"model": ErrorResponse, "description": "no such stored response"}},
    )
    app.add_api_route(
        "/v1/responses/{response_id}/input_items",
        input_items_route,
        methods=["GET"],
        responses={404: {"model": ErrorResponse, "description": "no such stored response"}},
    )
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    if opts.web:
        from ..web import add_routes

        add_routes(app)
    guarded: Any = BodyGuard(KeyGuard(app, opts.api_key), opts.max_body_bytes, opts.body_timeout_s)
    if metrics is not None:
        guarded = MetricsGuard(guarded, metrics)
    outer = LocalGuard(RequestLog(guarded, opts.model_name), opts)
    outer.client = client  # type: ignore[attr-defined]
    outer.fastapi = app  # type: ignore[attr-defined]
    return outer


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or ``OSError`` saying why not (before any
    "serving on" line is printed)."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is not in 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = (
            "is already in use"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be used ({exc.strerror})"
        )
        raise OSError(f"{host}:{port} {reason}; choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock


class SignalledServer(uvicorn.Server):
    """uvicorn's server, which on SIGINT / SIGTERM first ends the engine client's
    generations, and returns normally afterwards (no re-raised signal)."""

    def __init__(self, config: uvicorn.Config, client: EngineClient) -> None:
        super().__init__(config)
        self.client = client

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Generations end now; uvicorn then drains the connections."""
        self.client.shutdown()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Our handlers while serving. (uvicorn's re-raise the signal after shutting down,
        exit 130 / 143; a signal here means "shut down cleanly", which it has.)"""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def serve(
    engine: Any,
    *,
    host: str | None = None,
    port: int | None = None,
    options: ServerOptions | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Run the server until SIGINT or SIGTERM (``mlx-harmony-core serve``); ``host`` and
    ``port`` default to the options'.

    On a signal it stops accepting, ends running generations at their next token (a final
    chunk with ``finish_reason: "cancelled"``, then ``[DONE]``), answers waiting requests
    503, and returns within about two seconds.
    """
    opts = options or ServerOptions(**({} if host is None else {"host": host}))
    host = opts.host if host is None else host
    port = opts.port if port is None else port
    app = create_app(engine, opts)
    client: EngineClient = app.client
    logs: dict[str, Any] = {}
    if opts.log_format == "json":  # ours for every line; the request log replaces access lines
        use_json_logs()
        logs = {"log_config": None, "access_log": False}
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2, **logs
    )
    server = SignalledServer(config, client)
    sock = sock or bind(host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        client.shutdown()
        client.wait_idle(timeout=2)  # the generation thread parks before the process exits
        app.fastapi.state.responses.close()  # the stored responses' database
