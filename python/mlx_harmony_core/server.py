"""OpenAI-compatible HTTP server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

One worker thread runs every generation (MLX evaluates one graph at a time on a device);
requests wait in a bounded queue in front of it and get a 503 with ``Retry-After`` when it
is full. Events cross from the worker to the event loop through an asyncio queue; a
client that disconnects sets its job's cancel flag, which the engine polls every token.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_format import REASONING
from .errors import CapacityError, ContextLengthError, InvalidRequestError
from .messages import check_text
from .params import INT32_MAX, SamplingParams, constraints, problems, sampling_params
from .scheduler import END, MAX_BATCH, PREFILL_CHUNK, Handle, Scheduler
from .structured import reasoning_budget_field
from .threads import prepare

logger = logging.getLogger(__name__)

# Fields that clients send and that change nothing here: accepted and ignored.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = dict(self.headers or {})
        if self.status >= 500 and self.status != 503:
            headers["Connection"] = "close"  # after a server error, start afresh
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- requests ------------------------------------------------------------------------------


# Where OpenAI's API defines a sampling field's limits differently from SamplingParams, its
# own limits apply here (mapped once); vLLM's top_k = -1 means "off".
OPENAI_LIMITS: dict[str, dict[str, Any]] = {
    "temperature": {"ge": 0.0, "le": 2.0, "allow_inf_nan": False},
    "top_k": {"ge": -1, "le": INT32_MAX},
}


def api_limits(name: str) -> dict[str, Any]:
    """The server's limits for sampling field ``name``."""
    return {**constraints(name), **OPENAI_LIMITS.get(name, {})}


class _RequestFields(BaseModel):
    """Fields shared by both endpoints; strict types, as OpenAI's API has."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)

    def params(self) -> SamplingParams:
        fields = {k: getattr(self, k) for k in SamplingParams.model_fields}
        if fields.get("top_k") == -1:  # vLLM's "off"
            fields["top_k"] = 0
        if self.logit_bias:  # type: ignore[attr-defined]
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}  # type: ignore[attr-defined]
            except ValueError:
                raise APIError(
                    400, "logit_bias keys must be token ids", param="logit_bias"
                ) from None
        try:
            return sampling_params(fields)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 16 non-empty strings", param="stop")
        return stops or None

    def checks(self, limit: int) -> None:
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported: send n requests", param="n")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name, None)
            if value is not None and value > limit:
                raise APIError(
                    400,
                    f"{name} is {value}, over this server's limit of {limit} (--max-tokens-limit)",
                    param=name,
                )


def _sampling_fields() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in SamplingParams.model_fields.items():
        if name == "logit_bias":  # JSON object keys are strings
            out[name] = (dict[str, float] | None, Field(None, description=f.description))
        else:
            out[name] = (
                f.annotation | None,
                Field(None, description=f.description, **api_limits(name)),
            )
    return out


# Every SamplingParams field, under OpenAI's limits where OpenAI defines them.
_Sampling = create_model("_Sampling", __base__=_RequestFields, **_sampling_fields())  # type: ignore[call-overload]


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema: enforced token by token"
    )
    max_reasoning_tokens: int | None = reasoning_budget_field()  # an extension


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (a raw prompt, no chat template)."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema: enforced token by token"
    )
    best_of: int | None = Field(None, ge=1)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    for key in IGNORED_FIELDS & data.keys():
        data.pop(key)
    try:
        return model.model_validate(data)
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"unrecognized request argument: {param}"
        elif err["loc"] and err["loc"][0] in SamplingParams.model_fields:
            msg = problems(exc, limits=api_limits)[0][1]
        else:
            msg = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, msg, param=param) from None


# -- the worker ------------------------------------------------------------------------------


@dataclass
class Job:
    """One request on its way through the scheduler: events handed to the event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    handle: Handle | None = None
    gone: bool = False  # the client disconnected
    cancelled: bool = False

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()


class Worker:
    """The server's face of the engine's batching scheduler: up to ``max_batch`` requests
    decode together, at most ``max_queue`` wait, later ones get a 503. :meth:`shutdown`
    ends running generations at their next token and answers waiting ones 503."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.closing = scheduler.closing
        self.idle = scheduler.idle

    @property
    def pending(self) -> int:
        return self.scheduler.pending

    def submit(self, job: Job, request: Any) -> None:
        if job.cancelled:  # the client left while its request was prepared
            job.emit(END)
            return
        try:
            job.handle = self.scheduler.submit(request, sink=job.emit)
        except CapacityError as exc:
            raise _as_api_error(exc) from None

    def shutdown(self) -> None:
        self.scheduler.shutdown()


# -- the app ---------------------------------------------------------------------------------


class BodyGuard:
    """ASGI middleware in front of the app: reads each request body whole before the app
    sees it, with a size limit (413) and a read deadline (408), so that neither an
    oversized, a chunked, a half-sent nor an abandoned upload ever reaches the handlers."""

    def __init__(self, app: Any, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(
                send, 413, f"the request body is larger than {self.limit} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                logger.info(
                    "%s: request body not received within %.0f s", _peer(scope), self.timeout
                )
                return await self._reject(
                    send, 408, f"the request body did not arrive within {self.timeout:g} s"
                )
            if message["type"] == "http.disconnect":
                logger.info("%s: client disconnected while sending its request", _peer(scope))
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(
                    send, 413, f"the request body is larger than {self.limit} bytes"
                )
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later: disconnect notices

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable, status: int, message: str) -> None:
        err = APIError(status, message, headers={"Connection": "close"})
        await err.response()({"type": "http"}, _empty_receive, send)  # an ASGI app


class KeyGuard:
    """ASGI middleware: ``/v1/`` needs ``Authorization: Bearer KEY`` when a key is set.
    (Plain ASGI, not Starlette's BaseHTTPMiddleware, which relays every streamed chunk
    through an extra task and memory stream.)"""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.key and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = next((v for k, v in scope.get("headers") or [] if k == b"authorization"), b"")
            scheme, _, token = given.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.key.encode()
            ):
                err = APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _peer(scope: dict) -> str:
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"


async def _empty_receive() -> dict:
    return {"type": "http.request", "body": b""}


@dataclass
class ServerOptions:
    """What ``serve`` was started with."""

    model_name: str = "demo"
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = MAX_BATCH
    kv_budget_bytes: int | None = None
    prefill_chunk: int = PREFILL_CHUNK
    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0
    default_max_tokens: int = 4096
    max_tokens_limit: int = 32768
    max_reasoning_tokens: int | None = None  # for requests that set none
    # Speculative decoding for every request (see speculative.py): "ngram" or "draft".
    speculative: str | None = None
    draft_model: Any = None  # an Engine, for "draft"
    num_draft: int | None = None
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    version: str = ""
    web: bool = True  # the chat page at / (web/); --no-web turns it off


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_WILDCARD = ("0.0.0.0", "::", "")


def _host_of(value: str) -> str:
    """``Host`` header without its port (``[::1]:80`` -> ``::1``)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class LocalGuard:
    """ASGI middleware: what stops a web page from using a server on a developer's machine.

    ``Host`` must name the bound address (or loopback, or ``--allowed-hosts``): a DNS-rebound
    page sends its own name. A browser's ``Origin`` must be listed in ``--cors-origins``
    (those get CORS headers); and a POST must say ``Content-Type: application/json``, which
    a page cannot send cross-site without a preflight.
    """

    def __init__(self, app: Any, opts: ServerOptions) -> None:
        self.app, self.opts = app, opts
        hosts = set(opts.allowed_hosts)
        if opts.host in _WILDCARD and not hosts:
            self.hosts: set[str] | None = None  # bound to every address: any name reaches it
        else:
            self.hosts = {_host_of(h) for h in (*hosts, opts.host, *_LOOPBACK)}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []
        }
        host = _host_of(headers.get("host", ""))
        if self.hosts is not None and host not in self.hosts:
            return await self._deny(
                send,
                421,
                f"Host {host!r} is not served here; start with --allowed-hosts to allow it",
            )
        origin = headers.get("origin")
        allowed_origin = origin is not None and (
            origin in self.opts.cors_origins or "*" in self.opts.cors_origins
        )
        # The chat page's own requests (same origin: a Host that passed the check above).
        same = origin is not None and self._same_origin(origin, headers.get("host", ""))
        if origin is not None and not allowed_origin and not same:
            return await self._deny(
                send,
                403,
                f"requests from the web origin {origin!r} are refused; list it in --cors-origins",
            )
        if scope["method"] == "OPTIONS" and allowed_origin:
            return await self._preflight(send, origin)  # type: ignore[arg-type]
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await self._deny(
                    send, 415, "send the body as JSON with 'Content-Type: application/json'"
                )
        if not allowed_origin:
            return await self.app(scope, receive, send)

        async def with_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_cors_headers(origin)]  # type: ignore[arg-type]
            await send(message)

        await self.app(scope, receive, with_cors)

    def _same_origin(self, origin: str, host: str) -> bool:
        """``Origin`` is this server as named by a checked ``Host`` (so never a rebound
        page's origin); with no Host check (bound to every address) nothing is."""
        return (
            self.opts.web
            and self.hosts is not None
            and bool(host)
            and origin in (f"http://{host}", f"https://{host}")
        )

    async def _deny(self, send: Callable, status: int, message: str) -> None:
        await APIError(status, message).response()({"type": "http"}, _empty_receive, send)

    async def _preflight(self, send: Callable, origin: str) -> None:
        headers = [
            *_cors_headers(origin),
            (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
            (b"access-control-allow-headers", b"authorization, content-type"),
            (b"access-control-max-age", b"600"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _cors_headers(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {...}}``."""

    error: ErrorBody


_ERRORS = {
    400: "invalid request (bad JSON, field, value or prompt)",
    401: "missing or wrong API key",
    404: "model not served",
    413: "request body too large",
    415: "body not sent as application/json",
    503: "queue full or shutting down (see Retry-After)",
}


def _post_docs(body: type[BaseModel]) -> dict[str, Any]:
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
            code: {"model": ErrorResponse, "description": d} for code, d in _ERRORS.items()
        },
    }


def create_app(engine: Any, options: ServerOptions | None = None) -> Any:
    """The ASGI app serving ``engine`` (which it then owns: nothing else may use it)."""
    opts = options or ServerOptions()
    worker = Worker(
        engine.batching(
            max_batch=opts.max_batch,
            max_queue=opts.max_queue,
            kv_budget_bytes=opts.kv_budget_bytes,
            prefill_chunk=opts.prefill_chunk,
        )
    )
    app = FastAPI(
        title="mlx-harmony-core", version=opts.version or "0", docs_url=None, redoc_url=None
    )
    app.state.worker = worker
    app.state.engine = engine
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})  # e.g. Allow on a 405
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=headers).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return APIError(500, f"internal error: {exc}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": opts.model_name, "queued": worker.pending}

    def model_entry(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "local",
            "max_tokens_limit": opts.max_tokens_limit,
            "context_length": engine.context_length,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(opts.model_name)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != opts.model_name:
            raise APIError(404, f"model {name!r} is not served", code="model_not_found")
        return model_entry(name)

    def check_model(name: str | None) -> None:
        if name is not None and name != opts.model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here; use {opts.model_name!r}",
                param="model",
                code="model_not_found",
            )

    async def parse(model: type[BaseModel], request: Request) -> Any:
        body = await request.body()
        # Large bodies parse off the event loop, so /health and streams keep flowing.
        if len(body) > 2**16:
            return await asyncio.to_thread(_parse, model, body)
        return _parse(model, body)

    @app.post("/v1/chat/completions", **_post_docs(ChatRequest))
    async def chat(request: Request) -> Any:
        req: ChatRequest = await parse(ChatRequest, request)
        req.checks(opts.max_tokens_limit)
        check_model(req.model)
        params, stops = req.params(), req.stops()
        max_tokens = req.max_completion_tokens or req.max_tokens or opts.default_max_tokens
        effort = {"minimal": "low"}.get(req.reasoning_effort or "", req.reasoning_effort)
        render: dict[str, Any] = {"reasoning_effort": effort or "medium"}
        if req.tools:
            render["tools"] = req.tools
            render["tool_choice"] = req.tool_choice
        elif req.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        top = req.top_logprobs if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

        def build() -> Any:
            return engine.request(
                req.messages,
                params,
                max_tokens=max_tokens,
                stop=stops,
                logprobs=top if req.logprobs else None,
                response_format=req.response_format,
                max_reasoning_tokens=req.max_reasoning_tokens
                if req.max_reasoning_tokens is not None
                else opts.max_reasoning_tokens,
                **_speculation(opts),
                **render,
            )

        return await _respond(request, worker, build, _ChatFormat(req, opts, engine))

    @app.post("/v1/completions", **_post_docs(CompletionRequest))
    async def completions(request: Request) -> Any:
        req: CompletionRequest = await parse(CompletionRequest, request)
        req.checks(opts.max_tokens_limit)
        check_model(req.model)
        if req.echo or req.suffix or (req.best_of or 1) > 1:
            raise APIError(400, "echo, suffix and best_of > 1 are not supported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(
                    400, "one prompt per request (batches: send several)", param="prompt"
                )
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        params, stops = req.params(), req.stops()

        def build() -> Any:
            # Tokenized on the preparation thread: never on the event loop.
            if isinstance(prompt, str):
                ids = engine.encode(check_text(prompt, "prompt"))
            else:
                ids = list(prompt)
            return engine.request(
                ids,
                params,
                max_tokens=req.max_tokens or 16,
                stop=stops,
                logprobs=req.logprobs,
                response_format=req.response_format,
                raw=True,
                **_speculation(opts),
            )

        return await _respond(request, worker, build, _TextFormat(req, opts, engine))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for body in (ChatRequest, CompletionRequest):
                js = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[body.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if opts.web:
        from .web import add_routes

        add_routes(app)
    guarded = BodyGuard(KeyGuard(app, opts.api_key), opts.max_body_bytes, opts.body_timeout_s)
    outer = LocalGuard(guarded, opts)
    outer.worker = worker  # type: ignore[attr-defined]
    outer.fastapi = app  # type: ignore[attr-defined]
    return outer


# -- responses -------------------------------------------------------------------------------


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` the moment its client disconnects: the body has been read, so the
    next ASGI message is the disconnect. (Once a stream has started, the streaming
    response notices the disconnect itself and closes the generator.)"""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.gone = True
            job.cancel()
            return


async def _respond(request: Request, worker: Worker, build: Callable, fmt: Any) -> Any:
    job = Job(asyncio.get_running_loop())
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        try:  # rendered and checked off the event loop; a bad request is a 400 here
            req = await asyncio.wrap_future(prepare(build))
        except Exception as exc:
            raise _as_api_error(exc) from None
        if job.gone:
            return Response(status_code=499)  # nobody is listening
        worker.submit(job, req)
        first = await job.events.get()
        if job.gone:
            return Response(status_code=499)
        if isinstance(first, Exception):
            job.cancel()
            raise _as_api_error(first)
        if not fmt.stream:
            item = first
            while item is not END:
                if isinstance(item, Exception):
                    raise _as_api_error(item)
                fmt.add(item)
                item = await job.events.get()
            if job.gone:
                return Response(status_code=499)
            return JSONResponse(fmt.body())
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()

    async def sse() -> AsyncIterator[bytes]:
        try:
            for chunk in fmt.start():
                yield _sse(chunk)
            item = first
            while item is not END:
                out = []
                # Everything already decoded goes out in one write (many streams share
                # one event loop; under load the tokens of one client queue up).
                while True:
                    if isinstance(item, Exception):
                        err = _as_api_error(item)
                        body = {"message": err.message, "type": err.type, "code": err.code}
                        out.append(_sse({"error": body}))
                        item = END
                        break
                    out += [_sse(chunk) for chunk in fmt.chunks(item)]
                    if job.events.empty():
                        break
                    item = job.events.get_nowait()
                    if item is END:
                        break
                if out:
                    yield b"".join(out)
                if item is not END:
                    item = await job.events.get()
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel()  # a disconnect closes this generator: stop generating

    return StreamingResponse(
        sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _as_api_error(exc: Exception) -> APIError:
    """By type: the caller's mistakes are 400s, anything else is ours (500, logged)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CapacityError):
        return APIError(
            503,
            str(exc),
            type="server_error",
            code=exc.code,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def _speculation(opts: ServerOptions) -> dict[str, Any]:
    if opts.speculative is None:
        return {}
    return {
        "speculative": opts.speculative,
        "draft_model": opts.draft_model,
        "num_draft": opts.num_draft,
    }


def _usage(completion: Any) -> dict[str, Any]:
    u = completion.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
        # Speculative decoding, in the fields OpenAI uses for predicted outputs.
        "completion_tokens_details": {
            "accepted_prediction_tokens": u.accepted_tokens,
            "rejected_prediction_tokens": u.drafted_tokens - u.accepted_tokens,
        },
    }


def _finish(reason: str) -> str:
    # "cancelled": the server is shutting down (a disconnected client sees nothing).
    return reason if reason in ("stop", "length", "tool_calls", "cancelled") else "stop"


class _Format:
    """Accumulates engine events; renders them as one body or as stream chunks."""

    object_name = ""
    prefix = ""

    def __init__(self, req: Any, opts: ServerOptions, engine: Any) -> None:
        self.req, self.opts, self.engine = req, opts, engine
        self.stream = req.stream
        self.id = f"{self.prefix}{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.parts: dict[str, list[str]] = {"content": [], "reasoning": []}
        self.completion: Any = None
        include = (req.stream_options or {}).get("include_usage", False)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        self.include_usage = bool(include)

    def head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": self.opts.model_name,
            "system_fingerprint": f"mlx-harmony-core-{self.opts.version}",
        }

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = bytes(self.engine.token_bytes()[token])
        return raw.decode("utf-8", "replace"), list(raw)

    def add(self, event: Any) -> None:
        if event.completion is not None:
            self.completion = event.completion
        elif event.recipient is None:
            key = "reasoning" if event.kind == REASONING else "content"
            self.parts[key].append(event.delta)

    def usage_chunk(self) -> list[dict[str, Any]]:
        if not self.include_usage or self.completion is None:
            return []
        head = {**self.head(), "object": self.chunk_object}
        return [{**head, "choices": [], "usage": _usage(self.completion)}]


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl-"

    def _calls(self) -> list[dict[str, Any]]:
        return [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.completion.tool_calls
        ]

    def _logprobs(self) -> dict[str, Any] | None:
        lps = self.completion.logprobs
        if lps is None:
            return None
        out = []
        for lp in lps:
            text, raw = self._token(lp.token)
            top = []
            for tid, value in lp.top:
                t_text, t_raw = self._token(tid)
                top.append({"token": t_text, "logprob": value, "bytes": t_raw})
            out.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": out}

    def body(self) -> dict[str, Any]:
        c = self.completion
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.parts["content"])}
        if self.parts["reasoning"]:
            message["reasoning_content"] = "".join(self.parts["reasoning"])
        if c.tool_calls:
            message["tool_calls"] = self._calls()
            message["content"] = message["content"] or None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(),
            "finish_reason": _finish(c.finish_reason),
        }
        return {**self.head(), "choices": [choice], "usage": _usage(c)}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return {**self.head(), "object": "chat.completion.chunk", "choices": [choice]}

    def start(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        self.add(event)
        if event.completion is None:
            if event.recipient is not None or not event.delta:
                return []  # tool-call arguments are sent whole, with their id, at the end
            key = "reasoning_content" if event.kind == REASONING else "content"
            return [self._chunk({key: event.delta})]
        out = []
        if self.completion.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(self._calls())]
            out.append(self._chunk({"tool_calls": calls}))
        out.append(
            self._chunk({}, _finish(self.completion.finish_reason), logprobs=self._logprobs())
        )
        return out + self.usage_chunk()


class _TextFormat(_Format):
    object_name = "text_completion"
    chunk_object = "text_completion"
    prefix = "cmpl-"

    def _logprobs(self) -> dict[str, Any] | None:
        lps = self.completion.logprobs
        if lps is None:
            return None
        tokens, values, tops, offsets, pos = [], [], [], [], 0
        for lp in lps:
            text, _ = self._token(lp.token)
            tokens.append(text)
            values.append(lp.logprob)
            tops.append({self._token(t)[0]: v for t, v in lp.top})
            offsets.append(pos)
            pos += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def body(self) -> dict[str, Any]:
        c = self.completion
        choice = {
            "index": 0,
            "text": "".join(self.parts["content"]),
            "logprobs": self._logprobs(),
            "finish_reason": _finish(c.finish_reason),
        }
        return {**self.head(), "choices": [choice], "usage": _usage(c)}

    def start(self) -> list[dict[str, Any]]:
        return []

    def chunks(self, event: Any) -> list[dict[str, Any]]:
        self.add(event)
        if event.completion is None:
            if not event.delta:
                return []
            choice = {"index": 0, "text": event.delta, "logprobs": None, "finish_reason": None}
            return [{**self.head(), "choices": [choice]}]
        choice = {
            "index": 0,
            "text": "",
            "logprobs": self._logprobs(),
            "finish_reason": _finish(self.completion.finish_reason),
        }
        return [{**self.head(), "choices": [choice]}, *self.usage_chunk()]


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


def serve(
    engine: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServerOptions | None = None,
    log_level: str = "info",
    sock: socket.socket | None = None,
) -> None:
    """Run the server until SIGINT or SIGTERM (``mlx-harmony-core serve``).

    On a signal it stops accepting, ends running generations at their next token (a final
    chunk with ``finish_reason: "cancelled"``, then ``[DONE]``), answers waiting requests
    503, and returns within about two seconds.
    """
    import uvicorn

    opts = options or ServerOptions(host=host)
    app = create_app(engine, opts)
    worker: Worker = app.worker

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            worker.shutdown()  # generations end now; uvicorn then drains the connections
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutting down (exit 130 / 143); a
            # signal here means "shut down cleanly", which it has.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2
    )
    server = _Server(config)
    sock = sock or bind(host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        worker.shutdown()
        worker.idle.wait(timeout=2)  # the generation thread parks before the process exits
