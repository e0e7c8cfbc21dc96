"""ASGI guards in front of the app, outermost first: :class:`LocalGuard` (Host, Origin,
Content-Type: what keeps web pages off a developer's server), :class:`BodyGuard` (the whole
body, within a size and a time limit) and :class:`KeyGuard` (the API key).

They are plain ASGI callables, not Starlette's ``BaseHTTPMiddleware``, which relays every
streamed chunk through an extra task and memory stream.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

from .options import ServerOptions
from .protocol import APIError

logger = logging.getLogger(__name__)


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
    """ASGI middleware: ``/v1/`` (and ``/metrics``, ``/tokenize``, ``/detokenize``) need
    ``Authorization: Bearer KEY`` when a key is set."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.key and scope["type"] == "http" and _keyed(scope["path"]):
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


KEYED = ("/metrics", "/tokenize", "/detokenize")


def _keyed(path: str) -> bool:
    """Whether ``path`` needs the API key (when one is set)."""
    return path.startswith("/v1/") or path in KEYED


def _peer(scope: dict) -> str:
    """``host:port`` of the client, for log lines."""
    client = scope.get("client") or ("?", 0)
    return f"{client[0]}:{client[1]}"


async def _empty_receive() -> dict:
    """An ASGI ``receive`` with nothing to give (for answers sent before the app runs)."""
    return {"type": "http.request", "body": b""}


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
