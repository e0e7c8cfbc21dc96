"""The file format of the prompt cache on disk (see :mod:`.prompt_store`).

Little-endian: ``MAGIC`` (8 bytes), format version (u32), header length (u64), header CRC-32
(u32), the JSON header (identity key, tokens, how far the cache can rewind, per layer its
kind, settings and arrays' dtype/shape/offset, the payload's size and CRC-32), then the
arrays' raw bytes back to back. Files are written to a temp name, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ._paths import public_mode
from .kv_cache import empty_cache

MAGIC = b"MHCKVPC\n"
FORMAT_VERSION = 1
SUFFIX = ".mhckv"
TMP_PREFIX = ".mhckv-tmp-"
_PREAMBLE = struct.Struct("<8sIQI")
_MX_TO_NP = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,  # numpy has no bfloat16: its bits travel as uint16
    "uint32": np.uint32,
    "int32": np.int32,
    "uint8": np.uint8,
    "int8": np.int8,
    "uint16": np.uint16,
    "int16": np.int16,
}


class CacheFileError(ValueError):
    """A cache file that cannot be used, and why: ``"corrupt"`` (ours, and deleted),
    ``"version"`` (ours, another format version: left to LRU eviction), ``"foreign"`` (not
    ours, or another model's: left alone) or ``"unusable"`` (left alone)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# One layer as the host holds it: kind, settings, arrays, their MLX dtype names.
Layers = list[tuple[str, dict[str, int], list[np.ndarray], list[str]]]


def write_atomically(path: Path, header: bytes, chunks: Iterable[memoryview | bytes]) -> int:
    """Write ``header`` and ``chunks`` to a temp file beside ``path``, fsync, rename over
    ``path``; returns the size. On any error the temp file is removed and the error raised."""
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")
    size = 0
    try:
        with open(tmp, "wb") as f:
            size += write_chunks(f, [header])
            size += write_chunks(f, chunks)
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename survives a crash once the dir is synced
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return size


def write_chunks(f: Any, chunks: Iterable[memoryview | bytes]) -> int:
    n = 0
    for chunk in chunks:
        n += f.write(chunk)
    return n


def encode(
    key: str, made_by: dict[str, Any], tokens: np.ndarray, layers: Layers, trimmable: int
) -> tuple[bytes, list[memoryview]]:
    """The header (preamble included) and payload chunks of a file holding ``layers``
    (kind, meta, host arrays, MLX dtype names) for ``tokens``, made by model ``key``."""
    chunks: list[memoryview] = []
    described = []
    offset, crc = 0, 0
    for kind, meta, arrays, dtypes in layers:
        specs = []
        for a, dtype in zip(arrays, dtypes, strict=True):
            view = memoryview(np.ascontiguousarray(a)).cast("B")
            specs.append(
                {"dtype": dtype, "shape": list(a.shape), "offset": offset, "nbytes": view.nbytes}
            )
            crc = zlib.crc32(view, crc)
            chunks.append(view)
            offset += view.nbytes
        described.append({"kind": kind, "meta": meta, "arrays": specs})
    header = {
        "identity": key,
        "made_by": made_by,
        "tokens": tokens.tolist(),
        "trimmable": trimmable,
        "layers": described,
        "payload_bytes": offset,
        "payload_crc32": crc,
        "created": time.time(),
    }
    body = json.dumps(header, separators=(",", ":")).encode()
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body))
    return pre + body, chunks


def read_header(f: Any) -> dict[str, Any]:
    """The checked header of the open cache file ``f`` (its payload is checked only by
    :func:`read`)."""
    pre = f.read(_PREAMBLE.size)
    if pre[:8] != MAGIC:
        raise CacheFileError("not a prompt cache file of mlx-harmony-core", reason="foreign")
    if len(pre) < _PREAMBLE.size:
        raise CacheFileError("truncated (its preamble is cut short)", reason="corrupt")
    _, version, hlen, hcrc = _PREAMBLE.unpack(pre)
    if version != FORMAT_VERSION:
        raise CacheFileError(
            f"has format version {version}; this build reads {FORMAT_VERSION}",
            reason="version",
        )
    size = os.fstat(f.fileno()).st_size
    if _PREAMBLE.size + hlen > size:
        raise CacheFileError("truncated (its header is cut short)", reason="corrupt")
    body = f.read(hlen)
    if zlib.crc32(body) != hcrc:
        raise CacheFileError("corrupt (header checksum mismatch)", reason="corrupt")
    try:
        header = json.loads(body)
    except ValueError:
        raise CacheFileError("corrupt (header is not JSON)", reason="corrupt") from None
    if not (
        isinstance(header, dict)
        and isinstance(header.get("identity"), str)
        and isinstance(header.get("tokens"), list)
        and all(isinstance(t, int) for t in header["tokens"])
        and isinstance(header.get("layers"), list)
        and isinstance(header.get("trimmable"), int)
        and isinstance(header.get("payload_bytes"), int)
    ):
        raise CacheFileError("corrupt (header lacks fields)", reason="corrupt")
    if _PREAMBLE.size + hlen + header["payload_bytes"] != size:
        raise CacheFileError("truncated (its size does not match its header)", reason="corrupt")
    return header


def read(path: Path) -> tuple[dict[str, Any], bytearray]:
    """The checked header and payload of the cache file at ``path``."""
    with open(path, "rb") as f:
        header = read_header(f)
        payload = bytearray(int(header["payload_bytes"]))
        if f.readinto(payload) != len(payload):
            raise CacheFileError("truncated (payload cut short)", reason="corrupt")
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise CacheFileError("corrupt (payload checksum mismatch)", reason="corrupt")
    return header, payload


def build(header: dict[str, Any], payload: bytearray) -> list[Any]:
    """The caches a file holds (their arrays built on this thread, not evaluated)."""
    caches = []
    n_tokens = len(header["tokens"])
    if not header["layers"]:
        raise CacheFileError("corrupt (no layers)", reason="corrupt")
    for layer in header["layers"]:
        arrays = []
        for spec in layer["arrays"]:
            np_dtype = _MX_TO_NP.get(spec["dtype"])
            if np_dtype is None:
                raise CacheFileError(f"corrupt (unknown dtype {spec['dtype']!r})", reason="corrupt")
            host = np.frombuffer(
                payload, dtype=np_dtype, count=int(np.prod(spec["shape"])), offset=spec["offset"]
            ).reshape(spec["shape"])
            a = mx.array(host)
            if spec["dtype"] == "bfloat16":
                a = a.view(mx.bfloat16)
            arrays.append(a)
        meta = {k: int(v) for k, v in layer["meta"].items()}
        if meta.get("offset") != n_tokens:
            raise CacheFileError(
                "corrupt (a layer's offset is not its token count)", reason="corrupt"
            )
        c = empty_cache(layer["kind"], meta)
        c.restore(arrays, meta)
        caches.append(c)
    return caches


def host_copy(a: mx.array) -> np.ndarray:
    """A host copy of an evaluated array (bfloat16 as its uint16 bits)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a, copy=True)
