"""``GET /v1/models``, ``GET /v1/models/{name}`` and ``GET /health``."""

from __future__ import annotations

from typing import Any

from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError


def model_entry(
    name: str, client: EngineClient, opts: ServerOptions, created: int
) -> dict[str, Any]:
    """One ``model`` object: the limits a client needs."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "local",
        "max_tokens_limit": opts.max_tokens_limit,
        "context_length": client.context_length,
    }


def list_models(client: EngineClient, opts: ServerOptions, created: int) -> dict[str, Any]:
    """The served model, as a one-entry list."""
    return {"object": "list", "data": [model_entry(opts.model_name, client, opts, created)]}


def get_model(name: str, client: EngineClient, opts: ServerOptions, created: int) -> dict[str, Any]:
    """The served model by name; 404 for any other."""
    if name != opts.model_name:
        raise APIError(404, f"model {name!r} is not served", code="model_not_found")
    return model_entry(name, client, opts, created)


def health(client: EngineClient, opts: ServerOptions) -> dict[str, Any]:
    """Liveness, the model and the requests waiting or running."""
    return {"status": "ok", "model": opts.model_name, "queued": client.pending}
