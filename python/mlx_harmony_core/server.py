"""OpenAI-compatible HTTP server: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

One worker thread runs every generation (MLX evaluates one graph at a time on a device);
requests wait in a bounded queue in front of it and get a 503 with ``Retry-After`` when it
is full. Events cross from the worker to the event loop through an asyncio queue; a
client that disconnects sets its job's cancel flag, which the engine polls every token.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import SamplingParams

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
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- requests ------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """OpenAI's sampling fields plus the common extensions (vLLM names)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens_to_keep: int | None = Field(None, ge=1)
    xtc_probability: float | None = Field(None, ge=0.0, le=1.0)
    xtc_threshold: float | None = Field(None, ge=0.0, le=0.5)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    repetition_context_size: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)

    def params(self) -> SamplingParams:
        fields = {
            k: getattr(self, k)
            for k in SamplingParams.model_fields
            if k != "logit_bias" and getattr(self, k, None) is not None
        }
        if fields.get("top_k") == -1:  # vLLM's "off"
            fields["top_k"] = 0
        if self.logit_bias:
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise APIError(
                    400, "logit_bias keys must be token ids", param="logit_bias"
                ) from None
        try:
            return SamplingParams(**fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = str(err["loc"][0])
            raise APIError(400, f"{param}: {err['msg']}", param=param) from None

    def stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 16 non-empty strings", param="stop")
        return stops or None

    def checks(self) -> None:
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported: send n requests", param="n")


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (a raw prompt, no chat template)."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


def _parse(model: type[BaseModel], body: bytes) -> Any:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    for key in IGNORED_FIELDS & data.keys():
        data.pop(key)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unrecognized request argument: {param}"
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


# -- the worker ------------------------------------------------------------------------------

_DONE = object()


@dataclass
class Job:
    """One request's generation: run on the worker, events handed to the event loop."""

    run: Callable[[Callable[[], bool]], Iterator[Any]]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


def _mlx_thread_main(tasks: queue.Queue[Callable[[], None]]) -> None:
    while True:
        tasks.get()()


@functools.lru_cache(maxsize=1)
def _mlx_tasks() -> queue.Queue[Callable[[], None]]:
    """The process's one generation thread, started on first use and never stopped.

    A thread that has run MLX work must outlive the interpreter's shutdown: on Linux with
    MLX 0.32 such a thread exiting first aborts the process at exit ("terminate called
    without an active exception"). Every app in the process shares it, as they would
    share the device anyway.
    """
    tasks: queue.Queue[Callable[[], None]] = queue.Queue()
    threading.Thread(
        target=_mlx_thread_main, args=(tasks,), name="mhc-generation", daemon=True
    ).start()
    return tasks


class Worker:
    """Runs jobs one at a time on the generation thread; at most ``max_queue`` wait
    behind the running one, later ones get a 503."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self.pending = 0  # waiting + running

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.pending > self.max_queue:
                raise APIError(
                    503,
                    f"the server is busy ({self.pending} requests queued or running); retry later",
                    type="server_error",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self.pending += 1
        _mlx_tasks().put(lambda: self._run(job))

    def _run(self, job: Job) -> None:
        try:
            if not job.cancel.is_set():  # the engine polls the flag each token from here
                for event in job.run(job.cancel.is_set):
                    job.emit(event)
        except Exception as exc:  # reported to that client; the thread keeps serving
            if not isinstance(exc, ValueError | TypeError):
                logger.exception("generation failed")
            job.emit(exc)
        finally:
            job.emit(_DONE)
            with self._lock:
                self.pending -= 1


# -- the app ---------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes get a 413 before they are read."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        err = APIError(413, f"the request body is larger than {self.limit} bytes")
        await err.response()({"type": "http"}, _empty_receive, send)  # JSONResponse is an ASGI app


class _TooLarge(Exception):
    pass


async def _empty_receive() -> dict:
    return {"type": "http.request", "body": b""}


@dataclass
class ServerOptions:
    """What ``serve`` was started with."""

    model_name: str = "demo"
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 4 * 2**20
    default_max_tokens: int = 4096
    version: str = ""


def create_app(engine: Any, options: ServerOptions | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (which it then owns: nothing else may use it)."""
    opts = options or ServerOptions()
    worker = Worker(opts.max_queue)
    app = FastAPI(title="mlx-harmony-core", docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.engine = engine
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return APIError(500, f"internal error: {exc}", type="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next: Callable) -> Any:
        if opts.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), opts.api_key.encode()
            ):
                return APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                ).response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": opts.model_name, "queued": worker.pending}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = {"id": opts.model_name, "object": "model", "created": started, "owned_by": "local"}
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != opts.model_name:
            raise APIError(404, f"model {name!r} is not served", code="model_not_found")
        return {"id": name, "object": "model", "created": started, "owned_by": "local"}

    def check_model(name: str | None) -> None:
        if name is not None and name != opts.model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here; use {opts.model_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req: ChatRequest = _parse(ChatRequest, await request.body())
        req.checks()
        check_model(req.model)
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(
                400,
                "response_format other than 'text' is not supported",
                param="response_format",
            )
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

        def run(should_stop: Callable[[], bool]) -> Iterator[Any]:
            return engine.stream(
                req.messages,
                params,
                max_tokens=max_tokens,
                stop=stops,
                logprobs=top if req.logprobs else None,
                should_stop=should_stop,
                **render,
            )

        return await _respond(request, worker, run, _ChatFormat(req, opts, engine))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req: CompletionRequest = _parse(CompletionRequest, await request.body())
        req.checks()
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
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        vocab = len(engine.token_bytes())
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        params, stops = req.params(), req.stops()

        def run(should_stop: Callable[[], bool]) -> Iterator[Any]:
            return engine.stream(
                ids,
                params,
                max_tokens=req.max_tokens or 16,
                stop=stops,
                logprobs=req.logprobs,
                raw=True,
                should_stop=should_stop,
            )

        return await _respond(request, worker, run, _TextFormat(req, opts, engine))

    return BodyLimit(app, opts.max_body_bytes)  # type: ignore[return-value]


# -- responses -------------------------------------------------------------------------------


_GONE = object()


async def _next(job: Job, request: Request) -> Any:
    """The job's next item; a client that went away cancels the job (``_GONE``)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return _GONE


async def _respond(request: Request, worker: Worker, run: Callable, fmt: Any) -> Any:
    job = Job(run, asyncio.get_running_loop())
    worker.submit(job)
    try:
        first = await _next(job, request)
    except BaseException:
        job.cancel.set()
        raise
    if first is _GONE:
        return Response(status_code=499)  # nobody is listening
    if isinstance(first, Exception):
        job.cancel.set()
        raise _as_api_error(first)
    if not fmt.stream:
        try:
            item = first
            while item is not _DONE:
                if isinstance(item, Exception):
                    raise _as_api_error(item)
                fmt.add(item)
                item = await _next(job, request)
                if item is _GONE:
                    return Response(status_code=499)
        finally:
            job.cancel.set()
        return JSONResponse(fmt.body())

    async def sse() -> AsyncIterator[bytes]:
        try:
            for chunk in fmt.start():
                yield _sse(chunk)
            item = first
            while item is not _DONE:
                if isinstance(item, Exception):
                    err = _as_api_error(item)
                    yield _sse({"error": {"message": err.message, "type": err.type}})
                    break
                for chunk in fmt.chunks(item):
                    yield _sse(chunk)
                item = await job.events.get()
            yield b"data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a disconnect closes this generator: stop generating

    return StreamingResponse(
        sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _as_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError | TypeError):
        code = "context_length_exceeded" if "context window" in str(exc) else None
        return APIError(400, str(exc), code=code)
    return APIError(500, f"generation failed: {exc}", type="server_error")


def _usage(completion: Any) -> dict[str, Any]:
    u = completion.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


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
            key = "reasoning" if event.channel == "analysis" else "content"
            self.parts[key].append(event.delta)

    def usage_chunk(self) -> list[dict[str, Any]]:
        if not self.include_usage or self.completion is None:
            return []
        return [{**self.head(), "choices": [], "usage": _usage(self.completion)}]


class _ChatFormat(_Format):
    object_name = "chat.completion"
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
            key = "reasoning_content" if event.channel == "analysis" else "content"
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


def serve(
    engine: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServerOptions | None = None,
    log_level: str = "info",
) -> None:
    """Run the server until interrupted (``mlx-harmony-core serve``)."""
    import uvicorn

    app = create_app(engine, options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
