"""KV caches (C++) for mlx-lm models: choosing them per layer, saving and loading them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import _core
from ._paths import public_mode

Cache = _core.Cache
KVCache = _core.KVCache
RotatingKVCache = _core.RotatingKVCache
QuantizedKVCache = _core.QuantizedKVCache
BatchKVCache = _core.BatchKVCache

FORMAT = "mlx-harmony-core-cache"
VERSION = "1"
History = int | str


def make_cache(
    model: Any,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 0,
    history: History = 4096,
) -> list[Any]:
    """One cache per layer of ``model``.

    The model's own ``make_cache()`` with mlx-lm's caches replaced by ours, else a full
    cache per layer: full-attention layers get a :class:`KVCache` (a
    :class:`QuantizedKVCache` with ``kv_bits``; ``kv_group_size`` 0 picks 64 or 32 from the
    head dim, padding a narrow head), sliding layers (GPT-OSS's every other one) a
    :class:`RotatingKVCache` of the model's window that keeps ``history`` extra tokens
    ('window', 'all' or a number) so multi-turn reuse can rewind. Layers with other state,
    such as SSMs, keep mlx-lm's.
    """
    full = (lambda: QuantizedKVCache(kv_bits, kv_group_size)) if kv_bits else KVCache
    if hasattr(model, "make_cache"):
        out = []
        for c in model.make_cache():
            name = type(c).__name__
            if name == "KVCache":
                out.append(full())
            elif name == "RotatingKVCache":
                out.append(RotatingKVCache(c.max_size, c.keep, history))
            elif name == "QuantizedKVCache":
                out.append(QuantizedKVCache(c.bits, c.group_size))
            else:
                out.append(c)
        return out
    return [full() for _ in model.layers]


def make_batch_cache(caches: Sequence[Any]) -> list[Any] | None:
    """Empty batch caches matching the per-layer ``caches`` of one sequence (from
    :func:`make_cache`), or ``None`` when some layer cannot batch (mlx-lm's own caches, such
    as SSM state, or a sliding window with attention sinks)."""
    out = []
    for c in caches:
        if isinstance(c, QuantizedKVCache):
            out.append(BatchKVCache(0, -1, c.kv_bits, c.group_size))
        elif isinstance(c, RotatingKVCache):
            if c.keep:
                return None
            out.append(BatchKVCache(c.max_size, c.history))
        elif isinstance(c, KVCache):
            out.append(BatchKVCache())
        else:
            return None
    return out


def rewind_rows(caches: Sequence[Any] | None, back: list[int], solo: bool) -> None:
    """Rewind each row of a batch's caches by its own ``back[i]`` tokens (a lone row's
    caches with ``trim``); raises ``RuntimeError`` when a cache cannot (the rows' tokens
    would no longer match their caches)."""
    if solo:
        got = [min(c.trim(back[0]) for c in caches or [])] if back[0] else [0]
    else:
        got = back
        for layer in caches or []:
            if list(layer.rewind(back)) != back:
                got = []
    if got != back:
        raise RuntimeError("a KV cache could not rewind a rejected draft")


def kv_bytes_per_token(model: Any, caches: Sequence[Any]) -> list[int]:
    """Bytes per token each layer's cache holds, measured by running two tokens through
    ``caches`` (fresh ones: they are used up)."""
    model(mx.array([[0, 0]], dtype=mx.int32), cache=list(caches))
    return [sum(int(a.nbytes) for a in c.state) // 2 for c in caches]


def kv_bytes(caches: Sequence[Any], per_token: Sequence[int], tokens: int) -> int:
    """Bytes one sequence of ``tokens`` tokens holds in caches like ``caches``: full layers
    grow with it, sliding layers stop at their window plus history."""
    total = 0
    for c, b in zip(caches, per_token, strict=True):
        n = tokens
        if isinstance(c, RotatingKVCache) and c.history >= 0:
            n = min(tokens, c.max_size + c.history)
        total += n * b
    return total


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What a cache depends on: architecture and attention shapes, not the weights' values."""
    args = getattr(model, "args", None)
    fields = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "vocab_size",
        "num_attention_heads",
    )
    fp = {f: getattr(args, f, None) for f in fields} if args is not None else {}
    fp["layers"] = len(getattr(model, "layers", []))
    return fp


def save_cache(
    path: str | os.PathLike[str],
    caches: Sequence[Any],
    metadata: Mapping[str, Any] | None = None,
    *,
    model: Any = None,
) -> None:
    """Save caches (and JSON-able ``metadata``) to a safetensors file, atomically.

    Pass ``model`` to record its fingerprint, so :func:`load_cache` can refuse the file for
    another model. A checksum over the arrays catches corruption.
    """
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, c in enumerate(caches):
        if not isinstance(c, Cache):
            raise TypeError(
                f"cache {i} is a {type(c).__name__}; only mlx-harmony-core caches can be saved"
            )
        state = c.state
        for j, a in enumerate(state):
            arrays[f"{i}.{j}"] = a
        layers.append({"kind": c.kind, "meta": c.meta(), "arrays": len(state)})
    mx.eval(list(arrays.values()))
    header = {
        "format": FORMAT,
        "version": VERSION,
        "layers": json.dumps(layers),
        "metadata": json.dumps(dict(metadata or {})),
        "model": json.dumps(model_fingerprint(model) if model is not None else None),
        "checksum": _checksum(arrays),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=header)
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(
    path: str | os.PathLike[str], *, model: Any = None
) -> tuple[list[Any], dict[str, Any]]:
    """Load caches saved by :func:`save_cache`; returns ``(caches, metadata)``.

    Raises ``ValueError`` for a missing, corrupted or foreign file, or (with ``model``) a
    cache made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cache file {path} does not exist")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise ValueError(
            f"{path} is not a readable safetensors cache file ({exc}); it may be corrupted"
        ) from exc
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mlx-harmony-core cache file")
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} has cache format version {header.get('version')}; expected {VERSION}"
        )
    if _checksum(arrays) != header.get("checksum"):
        raise ValueError(f"{path} is corrupted: its arrays do not match the saved checksum")
    saved_model = json.loads(header.get("model", "null"))
    if model is not None and saved_model is not None and saved_model != model_fingerprint(model):
        raise ValueError(
            f"{path} was saved for another model ({saved_model}); it cannot be used with this one"
        )
    caches = []
    for i, layer in enumerate(json.loads(header["layers"])):
        meta = {k: int(v) for k, v in layer["meta"].items()}
        try:
            c = empty_cache(layer["kind"], meta)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        c.restore([arrays[f"{i}.{j}"] for j in range(layer["arrays"])], meta)
        caches.append(c)
    if model is not None and len(caches) != len(getattr(model, "layers", caches)):
        raise ValueError(f"{path} has {len(caches)} layers; the model has {len(model.layers)}")
    return caches, json.loads(header.get("metadata", "{}"))


def empty_cache(kind: str, meta: Mapping[str, int]) -> Any:
    """An empty cache of ``kind`` (a cache's ``kind``) for ``restore(arrays, meta)`` with
    ``meta`` (its ``meta()``); ``ValueError`` for an unknown kind or missing settings."""
    try:
        if kind == "KVCache":
            return KVCache()
        if kind == "RotatingKVCache":
            return RotatingKVCache(int(meta["max_size"]), int(meta["keep"]), 0)
        if kind == "QuantizedKVCache":
            return QuantizedKVCache(int(meta["bits"]), int(meta["group_size"]))
    except KeyError as exc:
        raise ValueError(f"{kind} settings lack {exc}") from None
    raise ValueError(f"unknown cache kind {kind!r}")


def _checksum(arrays: Mapping[str, mx.array]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = arrays[key]
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).tobytes())
    return h.hexdigest()
