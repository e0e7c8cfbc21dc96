"""``GET /v1/models``, ``GET /v1/models/{name}`` and ``GET /health``.

A server of several models (a :class:`~.pool.ModelPool` as its client) lists each, with
its state (``loaded``, ``loading``, ``unloaded``), its memory and, for an adapter entry,
its ``parent`` (the base model whose weights it shares, as vLLM lists LoRA adapters).
"""

from __future__ import annotations

from typing import Any

from .client import EngineClient
from .options import ServerOptions
from .protocol import APIError


def model_entry(
    name: str, client: EngineClient, opts: ServerOptions, created: int
) -> dict[str, Any]:
    """One ``model`` object: the limits a client needs."""
    pool = _pool(client)
    if pool is not None:
        e = pool.entry(name)
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "local",
            "max_tokens_limit": e.opts.max_tokens_limit,
            **pool.describe(name),
        }
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "local",
        "max_tokens_limit": opts.max_tokens_limit,
        "context_length": client.context_length,
    }


def list_models(client: EngineClient, opts: ServerOptions, created: int) -> dict[str, Any]:
    """The served models (one, or each of a pool's, the default first)."""
    pool = _pool(client)
    names = pool.names if pool is not None else [opts.model_name]
    return {"object": "list", "data": [model_entry(n, client, opts, created) for n in names]}


def get_model(name: str, client: EngineClient, opts: ServerOptions, created: int) -> dict[str, Any]:
    """A served model by name; 404 for any other."""
    pool = _pool(client)
    if pool is not None:
        pool.entry(name)  # 404 naming the served models
    elif name != opts.model_name:
        raise APIError(404, f"model {name!r} is not served", code="model_not_found")
    return model_entry(name, client, opts, created)


def health(client: EngineClient, opts: ServerOptions) -> dict[str, Any]:
    """Liveness, the (default) model and the requests waiting or running; a pool adds
    each model's state."""
    pool = _pool(client)
    if pool is None:
        return {"status": "ok", "model": opts.model_name, "queued": client.pending}
    states = {n: pool.entries[n].state for n in pool.names}
    return {"status": "ok", "model": pool.default, "queued": client.pending, "models": states}


def _pool(client: Any) -> Any:
    """The client's :class:`~.pool.ModelPool`, if it is one (through the metrics wrapper)."""
    from .pool import ModelPool

    inner = getattr(client, "client", client)
    return inner if isinstance(inner, ModelPool) else None
