"""What every generation endpoint does with a parsed request: build it off the event loop,
submit it to the engine client, and answer with one body or a stream of events.

Events cross from the generation thread to the event loop through an asyncio queue (the
request's :class:`Job`); a client that disconnects cancels its request, which the scheduler
notices at its next token.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..errors import CapacityError
from ..threads import prepare
from .client import END, Cancellable, EngineClient
from .options import ServerOptions
from .protocol import APIError, as_api_error, parse_body
from .writers import StreamWriter


@dataclass
class Job:
    """One request on its way through the engine: its events, handed to the event loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    handle: Cancellable | None = None
    gone: bool = False  # the client disconnected
    cancelled: bool = False

    def emit(self, item: Any) -> None:
        """The sink: called on the generation thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        """Stop the request (at its next token), or before it is submitted."""
        self.cancelled = True
        if self.handle is not None:
            self.handle.cancel()

    def submit(self, client: EngineClient, request: Any) -> None:
        """Hand ``request`` to ``client``; a full queue is a 503."""
        if self.cancelled:  # the client left while its request was prepared
            self.emit(END)
            return
        try:
            self.handle = client.submit(request, self.emit)
        except CapacityError as exc:
            raise as_api_error(exc) from None


async def read_body(model: type[BaseModel], http: HTTPRequest) -> Any:
    """The request body parsed as ``model`` (large bodies off the event loop, so that
    ``/health`` and streams keep flowing)."""
    body = await http.body()
    if len(body) > 2**16:
        return await asyncio.to_thread(parse_body, model, body)
    return parse_body(model, body)


async def requested_model(http: HTTPRequest) -> str | None:
    """The ``model`` a request's JSON body names (None when it names none, or the body is
    not a JSON object: the endpoint's own parsing answers that). The body is read once:
    the endpoint reads it again from Starlette's cache."""
    body = await http.body()
    try:
        data = await asyncio.to_thread(json.loads, body) if len(body) > 2**16 else json.loads(body)
    except ValueError:
        return None
    name = data.get("model") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def check_model(name: str | None, opts: ServerOptions) -> None:
    """404 unless ``name`` is unset or the served model's."""
    if name is not None and name != opts.model_name:
        raise APIError(
            404,
            f"model {name!r} is not served here; use {opts.model_name!r}",
            param="model",
            code="model_not_found",
        )


def speculation(opts: ServerOptions) -> dict[str, Any]:
    """The request options for ``--speculative``."""
    if opts.speculative is None:
        return {}
    return {
        "speculative": opts.speculative,
        "draft_model": opts.draft_model,
        "num_draft": opts.num_draft,
    }


async def _watch_disconnect(http: HTTPRequest, job: Job) -> None:
    """Cancel ``job`` the moment its client disconnects: the body has been read, so the
    next ASGI message is the disconnect. (Once a stream has started, the streaming
    response notices the disconnect itself and closes the generator.)"""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            job.gone = True
            job.cancel()
            return


async def respond(
    http: HTTPRequest, client: EngineClient, build: Callable[[], Any], writer: StreamWriter
) -> Response:
    """Run ``build`` (which returns the engine request; it may raise the caller's errors)
    on the preparation thread, submit its result and answer through ``writer``: one JSON
    body, or an event stream framed by ``writer.framing``. A client gone before the answer
    gets nothing (499 in the log)."""
    job = Job(asyncio.get_running_loop())
    watcher = asyncio.create_task(_watch_disconnect(http, job))
    try:
        try:  # rendered and checked off the event loop; a bad request is a 400 here
            req = await asyncio.wrap_future(prepare(build))
        except Exception as exc:
            raise as_api_error(exc) from None
        if job.gone:
            return Response(status_code=499)  # nobody is listening
        job.submit(client, req)
        first = await job.events.get()
        if job.gone:
            return Response(status_code=499)
        if isinstance(first, Exception):
            job.cancel()
            raise as_api_error(first)
        if not writer.stream:
            item = first
            while item is not END:
                if isinstance(item, Exception):
                    raise as_api_error(item)
                writer.add(item)
                item = await job.events.get()
            if job.gone:
                return Response(status_code=499)
            return JSONResponse(writer.body())
    except BaseException:
        job.cancel()
        raise
    finally:
        watcher.cancel()
    return StreamingResponse(
        _events(job, first, writer),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _events(job: Job, first: Any, writer: StreamWriter) -> AsyncIterator[bytes]:
    """The stream's bytes: the writer's items for each event, framed, then the framing's
    terminator. Everything already decoded goes out in one write (many streams share one
    event loop; under load the tokens of one client queue up)."""
    frame = writer.framing.frame
    try:
        for item in writer.start():
            yield frame(item)
        event = first
        while event is not END:
            out = []
            while True:
                if isinstance(event, Exception):
                    out.append(frame(writer.framing.error(as_api_error(event))))
                    event = END
                    break
                out += [frame(item) for item in writer.chunks(event)]
                if job.events.empty():
                    break
                event = job.events.get_nowait()
                if event is END:
                    break
            if out:
                yield b"".join(out)
            if event is not END:
                event = await job.events.get()
        if writer.framing.done:
            yield writer.framing.done
    finally:
        job.cancel()  # a disconnect closes this generator: stop generating
