"""The chat page served at ``/`` (``serve``; ``--no-web`` turns it off).

Three static files shipped in this package (no build step, nothing fetched from elsewhere):
``index.html``, ``app.js`` and ``app.css``. The page is a client of the server's own HTTP
API (``/v1/chat/completions`` streamed, ``/v1/models``), with the same API key and origin
checks as any other client; its settings panel is generated from the request schema in
``/openapi.json``, so limits live in one place (the server's request models).
"""

from __future__ import annotations

import logging
from functools import cache
from importlib import resources
from typing import Any

from fastapi.responses import Response

logger = logging.getLogger(__name__)

# Everything the page loads comes from this server; nothing may frame it.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one of the page's files (read once from the package)."""
    if name not in FILES:
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()


def page_size() -> int:
    """Total bytes of the page's files (kept small: under 100 KB)."""
    return sum(len(asset(name)) for name in FILES)


def _response(name: str) -> Response:
    return Response(
        asset(name),
        media_type=FILES[name],
        headers={
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )


def add_routes(app: Any) -> None:
    """Serve the page on ``app``: ``GET /`` and ``GET /web/{app.js,app.css}`` (kept out of
    the OpenAPI schema)."""

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _response("index.html")

    @app.get("/web/app.js", include_in_schema=False)
    async def script() -> Response:
        return _response("app.js")

    @app.get("/web/app.css", include_in_schema=False)
    async def style() -> Response:
        return _response("app.css")

    logger.debug("chat page at / (%d bytes)", page_size())
