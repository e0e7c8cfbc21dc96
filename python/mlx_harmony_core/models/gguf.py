"""GGUF files (llama.cpp's format) loaded directly: weights, hyperparameters, tokenizer and
chat template, mapped onto mlx-lm's model classes.

The header is read first (no tensor data), so the weights' size is checked against free
memory before anything loads. Tensor names are mapped through the ``gguf`` package's
name tables (llama.cpp's own), starting from the mlx-lm model's parameter names, so every
architecture mlx-lm and llama.cpp both know maps the same way. Which architectures map, and
how each differs (its config keys, what llama.cpp's converter changed in its tensors: the q/k
row permutation of ``llama`` models, Gemma's norm offset), its model family says
(:mod:`mlx_harmony_core.families`).
Quantized tensors stay quantized where MLX has the format (Q4_0, Q4_1 and Q8_0 as MLX
affine 4/8-bit with groups of 32, MXFP4 as MLX ``mxfp4``; the K-quants and Q5_0/Q5_1 as
affine 2-6 bit, exactly: :mod:`.gguf_kquants`); F32/F16/BF16 load as stored; any other type
is refused by name.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..cpu.quant import MLX_GROUPS
from ..errors import ModelLoadError
from ..families import family_for, gguf_architectures
from ..progress import BIG_FILE, ProgressBar
from .gguf_kquants import KQUANTS, decode, pack_bits
from .gguf_tokenizer import eos_ids, gguf_tokenizer, gguf_tokenizer_wrapper  # noqa: F401

logger = logging.getLogger(__name__)

# GGML tensor types: (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
# What loads, and as what: quantized types as (bits, group size, MLX mode).
_FLOAT = {0: np.float32, 1: np.float16, 30: np.uint16}
_QUANTIZED = {
    2: (4, 32, "affine"),
    3: (4, 32, "affine"),
    8: (8, 32, "affine"),
    39: (4, 32, "mxfp4"),
    **{k: (bits, group, "affine") for k, (bits, group, _) in KQUANTS.items()},
}

# -- the file ---------------------------------------------------------------------------------


@dataclass
class TensorInfo:
    """One tensor's place in the file: ``shape`` in row-major (numpy) order."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # absolute, in bytes
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type, (f"type {self.type}", 0, 0))[0]


@dataclass
class GGUFFile:
    """A GGUF file's header: metadata and tensor directory (no tensor data)."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        """An architecture key (``block_count`` is ``{arch}.block_count``) or a full key."""
        return self.metadata.get(f"{self.architecture}.{key}", self.metadata.get(key, default))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelLoadError(f"{self.path} is truncated (its header ends early)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path} is truncated (its header ends early)")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.take("<I"), self.take("<Q")
            if item in _SCALARS or item == 6:  # a numeric array: one unpack
                fmt = _SCALARS.get(item, "<f")
                size = struct.calcsize(fmt) * n
                if self.pos + size > len(self.buf):
                    raise ModelLoadError(f"{self.path} is truncated (its header ends early)")
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos)
                self.pos += size
                return arr.copy()
            return [self.value(item) for _ in range(n)]
        if kind == 6:  # float32: shortest text that round-trips (1e-05, not 9.99999974e-06)
            return float(np.format_float_positional(np.float32(self.take("<f")), trim="-"))
        raise ModelLoadError(f"{self.path}: unknown GGUF metadata type {kind}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read a GGUF file's header (metadata and tensor directory; no tensor data)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise ModelLoadError(f"{path} is empty, not a GGUF file") from None
    try:
        if buf[:4] != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.take("<I")
        if version not in (2, 3):
            raise ModelLoadError(f"{path} is GGUF version {version}; versions 2 and 3 load")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            kind, offset = cur.take("<I"), cur.take("<Q")
            infos.append((name, tuple(reversed(dims)), kind, offset))
        align = int(metadata.get("general.alignment", 32))
        start = (cur.pos + align - 1) // align * align
        out = GGUFFile(path, version, metadata)
        for name, shape, kind, offset in infos:
            _, block, size = GGML_TYPES.get(kind, ("", 1, 0))
            count = int(np.prod(shape)) if shape else 1
            nbytes = count // block * size if block else 0
            if start + offset + nbytes > len(buf):
                raise ModelLoadError(f"{path} is truncated (tensor {name} ends past the file)")
            out.tensors[name] = TensorInfo(name, shape, kind, start + offset, nbytes)
        return out
    finally:
        buf.close()


# -- tensors ------------------------------------------------------------------------------------

# Tensors are read and converted this many bytes of the file at a time: besides the loaded
# arrays, one chunk and its temporaries are held. (Two threads, one reading while the other
# converts, measured no faster on this 2-core machine.)
CHUNK_BYTES = 16 * 2**20

# Each type's block layout in the file, and what MLX keeps per block of 32 weights.
_LAYOUTS: dict[int, list[tuple[str, str, int]]] = {
    2: [("d", "<f2", 1), ("qs", "u1", 16)],  # Q4_0: d * (q - 8)
    3: [("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", 16)],  # Q4_1: d * q + m
    8: [("d", "<f2", 1), ("qs", "u1", 32)],  # Q8_0: d * q, q signed
    39: [("e", "u1", 1), ("qs", "u1", 16)],  # MXFP4: e2m1 codes, E8M0 scale
}
# Bytes in memory per block of 32 (codes + scales + biases) and per float element.
_LOADED_BLOCK = {2: 16 + 2 + 2, 3: 16 + 2 + 2, 8: 32 + 2 + 2, 39: 16 + 1}
_LOADED_FLOAT = {0: 4, 1: 2, 30: 2}


def _nibble_table() -> np.ndarray:
    """ggml's 4-bit block (element j in the low nibble of byte j, j+16 in its high one) to
    MLX's packing (elements 2k, 2k+1 in byte k), two source bytes at a time: for the pair
    ``v = qs[2m] | qs[2m+1] << 8`` the low result byte is MLX's byte m, the high one m+8."""
    v = np.arange(65536, dtype=np.uint32)
    lo = (v & 0x0F) | ((v >> 4) & 0xF0)
    hi = ((v >> 4) & 0x0F) | ((v >> 8) & 0xF0)
    return (lo | hi << 8).astype(np.uint16)


_NIBBLES = _nibble_table()


class FileSource:
    """A GGUF file's bytes read with ``pread`` into one reusable buffer: the file's pages go
    to the page cache, never into this process's resident memory (as a mapping's would)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self._buf = np.empty(0, np.uint8)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def readinto(self, dest: np.ndarray, offset: int) -> None:
        """Fill ``dest`` (contiguous bytes) from the file at ``offset``."""
        view = memoryview(dest).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ModelLoadError(f"file ended at byte {offset + done} while reading")
            done += n

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` at ``offset``, in the reusable buffer (valid until the next read)."""
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, np.uint8)
        out = self._buf[:nbytes]
        self.readinto(out, offset)
        return out


class _BufferSource:
    """The same reads from a buffer (an ``mmap`` or ``bytes``)."""

    def __init__(self, buf: Any) -> None:
        self.buf = buf

    def readinto(self, dest: np.ndarray, offset: int) -> None:
        dest.reshape(-1)[:] = self.read(offset, dest.nbytes)

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        return np.frombuffer(self.buf, dtype=np.uint8, count=nbytes, offset=offset)


class _Out:
    """An MLX array filled in place through a numpy view of its memory (no second copy of a
    tensor is ever made); where MLX gives no writable view, a numpy array copied at the end."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, arena: Any = None) -> None:
        self.array: mx.array | None = (
            mx.zeros(shape, dtype) if arena is None else arena.zeros(list(shape), dtype)
        )
        mx.eval(self.array)
        view = np.asarray(memoryview(self.array))
        if view.flags.writeable and view.flags.c_contiguous and view.nbytes == self.array.nbytes:
            self.np = view.reshape(shape)
        else:  # pragma: no cover - MLX builds without a writable buffer view
            self.array = None
            self.np = np.empty(shape, view.dtype)

    def done(self) -> mx.array:
        if self.array is None:  # pragma: no cover
            return mx.array(self.np)
        out, self.array, self.np = self.array, None, None
        return out


def tensor_arrays(
    gguf: GGUFFile,
    source: Any,
    info: TensorInfo,
    chunk_bytes: int = CHUNK_BYTES,
    arena: Any = None,
) -> dict[str, mx.array]:
    """One GGUF tensor as evaluated MLX arrays: ``{"": array}`` for floats; ``{"": packed,
    "scales": ..., "biases": ...}`` (``mxfp4``: no biases) for quantized types.

    ``source`` is a :class:`FileSource` (or any buffer holding the file, e.g. an ``mmap``).
    The arrays are allocated once and filled ``chunk_bytes`` of the file at a time: besides
    them, at most one chunk and its temporaries are held. With an ``arena`` (a
    ``_core.WeightArena``) they are made in it while it has room."""
    if info.type not in _FLOAT and info.type not in _QUANTIZED:
        raise ModelLoadError(
            f"{gguf.path}: tensor {info.name} is {info.type_name}, which does not load "
            "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, "
            "Q5_K, Q6_K, MXFP4); re-quantize the model "
            "with one of those, e.g. llama-quantize ... Q8_0"
        )
    src = source if hasattr(source, "readinto") else _BufferSource(source)
    if info.type in _FLOAT:
        kind = {0: mx.float32, 1: mx.float16, 30: mx.uint16}[info.type]
        out = _Out(info.shape, kind, arena)
        flat = out.np.reshape(-1).view(np.uint8)
        for a in range(0, info.nbytes, chunk_bytes):
            src.readinto(flat[a : a + chunk_bytes], info.offset + a)
        arr = out.done()
        return {"": arr.view(mx.bfloat16) if info.type == 30 else arr}
    if info.type in KQUANTS:
        return _kquant_arrays(src, info, chunk_bytes, arena)
    lead = info.shape[:-1]
    rows = math.prod(lead) if lead else 1
    cols = info.shape[-1]
    if cols % 32:
        raise ModelLoadError(f"tensor {info.name}: {cols} columns are not whole blocks of 32")
    blocks = cols // 32
    layout = _LAYOUTS[info.type]
    dtype = np.dtype([(n, t, (k,)) if k > 1 else (n, t) for n, t, k in layout])
    bits = _QUANTIZED[info.type][0]
    w = _Out((*lead, cols * bits // 32), mx.uint32, arena)
    codes = w.np.view(np.uint8).reshape(rows, blocks, 32 * bits // 8)
    scale_type = mx.uint8 if info.type == 39 else mx.float16
    scales = _Out((*lead, blocks), scale_type, arena)
    biases = _Out((*lead, blocks), mx.float16, arena) if info.type != 39 else None
    s = scales.np.reshape(rows, blocks)
    bias = biases.np.reshape(rows, blocks) if biases is not None else None
    row_bytes = blocks * dtype.itemsize

    def fill(r0: int, r1: int) -> None:
        raw = src.read(info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        b = raw.view(dtype).reshape(r1 - r0, blocks)
        if info.type == 8:  # MLX's 8-bit codes are unsigned: q + 128
            np.bitwise_xor(b["qs"], 0x80, out=codes[r0:r1])
            np.copyto(s[r0:r1], b["d"])
            bias[r0:r1] = (b["d"].astype(np.float32) * -128).astype(np.float16)
            return
        pairs = _NIBBLES[b["qs"].view("<u2")].view(np.uint8)  # (rows, blocks, 8 * 2)
        pairs = pairs.reshape(r1 - r0, blocks, 8, 2)
        np.copyto(codes[r0:r1, :, :8], pairs[..., 0])
        np.copyto(codes[r0:r1, :, 8:], pairs[..., 1])
        del pairs
        if info.type == 39:
            np.copyto(s[r0:r1], b["e"])
        elif info.type == 2:
            np.copyto(s[r0:r1], b["d"])
            bias[r0:r1] = (b["d"].astype(np.float32) * -8).astype(np.float16)
        else:
            np.copyto(s[r0:r1], b["d"])
            np.copyto(bias[r0:r1], b["m"])

    step = max(1, chunk_bytes // row_bytes)
    for r0 in range(0, rows, step):
        fill(r0, min(rows, r0 + step))
    out = {"": w.done(), "scales": scales.done()}
    if biases is not None:
        out["biases"] = biases.done()
    return out


def _kquant_arrays(
    src: Any, info: TensorInfo, chunk_bytes: int, arena: Any = None
) -> dict[str, mx.array]:
    """A K-quant or Q5_0/Q5_1 tensor in MLX's affine layout (:mod:`.gguf_kquants`)."""
    _, block, block_bytes = GGML_TYPES[info.type]
    bits, group, scale_dtype = KQUANTS[info.type]
    lead = info.shape[:-1]
    rows = math.prod(lead) if lead else 1
    cols = info.shape[-1]
    if cols % block:
        raise ModelLoadError(
            f"tensor {info.name}: {cols} columns are not whole {info.type_name} blocks of {block}"
        )
    blocks = cols // block
    w = _Out((*lead, cols * bits // 32), mx.uint32, arena)
    codes = w.np.view(np.uint8).reshape(rows, cols * bits // 8)
    kind = mx.float32 if scale_dtype == np.float32 else mx.float16
    scales = _Out((*lead, cols // group), kind, arena)
    biases = _Out((*lead, cols // group), kind, arena)
    s = scales.np.reshape(rows, cols // group)
    b = biases.np.reshape(rows, cols // group)
    row_bytes = blocks * block_bytes
    step = max(1, chunk_bytes // row_bytes)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = src.read(info.offset + r0 * row_bytes, (r1 - r0) * row_bytes)
        q, sc, bias = decode(info.type, raw.reshape(-1, block_bytes))
        codes[r0:r1] = pack_bits(q.reshape(r1 - r0, cols), bits)
        s[r0:r1] = sc.reshape(r1 - r0, -1)
        b[r0:r1] = bias.reshape(r1 - r0, -1)
    return {"": w.done(), "scales": scales.done(), "biases": biases.done()}


def loaded_bytes(info: TensorInfo, dequantize: bool = False) -> int:
    """Bytes ``info``'s tensor takes in memory once loaded (float32 if ``dequantize``)."""
    count = math.prod(info.shape) if info.shape else 1
    if info.type in KQUANTS:
        bits, group, scale_dtype = KQUANTS[info.type]
        per_group = group * bits // 8 + 2 * np.dtype(scale_dtype).itemsize
        return count * 4 if dequantize else count // group * per_group
    if info.type in _QUANTIZED:
        return count * 4 if dequantize else count // 32 * _LOADED_BLOCK[info.type]
    return count * _LOADED_FLOAT.get(info.type, 0) or info.nbytes


# -- config -------------------------------------------------------------------------------------


def gguf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The mlx-lm ``config.json`` a GGUF file's metadata describes (the common keys, then
    its family's own)."""
    arch = gguf.architecture
    family = family_for(arch=arch)
    if family is None:
        raise ModelLoadError(
            f"{gguf.path}: architecture {arch or '(none)'!r} is not one we map "
            f"(supported: {', '.join(gguf_architectures())})"
        )
    need = ["block_count", "embedding_length", "attention.head_count", *family.gguf_required]
    missing = [k for k in need if gguf.get(k) is None]
    if missing:
        raise ModelLoadError(f"{gguf.path}: metadata lacks {arch}.{missing[0]}")
    heads = int(gguf.get("attention.head_count"))
    hidden = int(gguf.get("embedding_length"))
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    embed = gguf.tensors.get("token_embd.weight")
    vocab = embed.shape[0] if embed is not None else len(tokens or [])
    cfg: dict[str, Any] = {
        "model_type": family.model_type,
        "num_hidden_layers": int(gguf.get("block_count")),
        "hidden_size": hidden,
        "intermediate_size": int(gguf.get("feed_forward_length", 4 * hidden)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(gguf.get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(gguf.get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(gguf.get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gguf.get("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    head_dim = gguf.get("attention.key_length")
    if head_dim is not None:
        cfg["head_dim"] = int(head_dim)
    if family.gguf_config is not None:
        try:
            cfg = family.gguf_config(gguf.get, cfg)
        except ValueError as exc:
            raise ModelLoadError(f"{gguf.path}: {exc}") from exc
    factor = gguf.get("rope.scaling.factor")
    kind = gguf.get("rope.scaling.type")
    if factor and kind in ("linear",) and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {"type": "linear", "factor": float(factor)}
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        cfg["eos_token_id"] = int(eos)
    return cfg


# -- weights ------------------------------------------------------------------------------------


# mlx-lm stacks a layer's experts as ``switch_mlp.*``; llama.cpp's name tables know the
# Hugging Face names (``experts.*``; Mixtral's ``experts.w1/w3/w2``).
_EXPERT_ALIASES = (
    ("switch_mlp.gate_proj", "experts.w1"),
    ("switch_mlp.up_proj", "experts.w3"),
    ("switch_mlp.down_proj", "experts.w2"),
    ("switch_mlp", "experts"),
)


def _names(model: nn.Module, arch: str, layers: int) -> dict[str, list[str]]:
    """mlx-lm parameter path -> the GGUF tensor names it may have (llama.cpp's tables)."""
    import gguf as gguf_names
    from mlx.utils import tree_flatten

    archs = {v: k for k, v in gguf_names.MODEL_ARCH_NAMES.items()}
    table = gguf_names.get_tensor_name_map(archs[arch], layers)
    out = {}
    for path, _ in tree_flatten(model.parameters()):
        base, _, suffix = path.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = path, ""
        name = table.get_name(base)
        for ours, theirs in _EXPERT_ALIASES:
            if name is None and ours in base:
                name = table.get_name(base.replace(ours, theirs))
        if name is not None:  # a bare parameter (GPT-OSS's sinks) is stored as NAME.weight
            out[path] = [f"{name}.{suffix}"] if suffix else [name, f"{name}.weight"]
    return out


def _plan(gguf: GGUFFile, model: nn.Module, config: dict[str, Any]) -> list[tuple[str, TensorInfo]]:
    """(mlx-lm parameter path, its GGUF tensor) for every parameter the file holds, in the
    file's order (read front to back)."""
    plan = []
    for path, candidates in _names(model, gguf.architecture, config["num_hidden_layers"]).items():
        info = next((gguf.tensors[n] for n in candidates if n in gguf.tensors), None)
        if info is not None:  # strict loading names what is missing
            plan.append((path, info))
    plan.sort(key=lambda item: item[1].offset)
    used = {info.name for _, info in plan}
    left = sorted(set(gguf.tensors) - used)
    if left:
        logger.warning("%s: %d tensors are not used (%s, ...)", gguf.path, len(left), left[0])
    return plan


def _quantized_modules(
    plan: list[tuple[str, TensorInfo]], exclude: frozenset[int] = frozenset()
) -> dict[str, tuple[int, int, str]]:
    """The modules whose tensors stay quantized: path -> (bits, group size, mode)."""
    return {
        path.rsplit(".", 1)[0]: _QUANTIZED[info.type]
        for path, info in plan
        if info.type in _QUANTIZED and info.type not in exclude
    }


# Threads reading and converting one tensor in the C++ loader (pread from the page cache
# and the repack both scale with cores; past 4 the memory bus is the limit).
LOAD_THREADS = max(1, min(4, os.cpu_count() or 1))
# Whether the loaded arrays' memory is advised as transparent huge pages (MADV_HUGEPAGE).
LOAD_HUGE_PAGES = True


def read_tensor(
    gguf: GGUFFile, source: Any, info: TensorInfo, arena: Any = None
) -> dict[str, mx.array]:
    """One GGUF tensor as evaluated MLX arrays, as :func:`tensor_arrays` gives them.

    From a :class:`FileSource`, types the C++ loader knows (F32, F16, BF16, Q4_0, Q4_1,
    Q8_0, MXFP4) go from the file to their final arrays in one pass on
    :data:`LOAD_THREADS` threads; anything else goes through :func:`tensor_arrays`
    (numpy), which is also the reference the C++ path equals bit for bit. With an ``arena``
    (a ``_core.WeightArena``) the arrays are made in it while it has room."""
    from .. import _core

    if not isinstance(source, FileSource) or not _core.gguf_type_supported(info.type):
        return tensor_arrays(gguf, source, info, arena=arena)
    try:
        arrays = _core.load_gguf_tensor(
            source.fd,
            info.offset,
            info.type,
            list(info.shape),
            LOAD_THREADS,
            LOAD_HUGE_PAGES,
            arena,
        )
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{gguf.path}: tensor {info.name}: {exc}") from exc
    return dict(zip(("", "scales", "biases"), arrays, strict=False))


# Whether a load on a CPU device maps the file and computes on GGUF's own blocks ("0" turns
# it off: every tensor is repacked into MLX's layout, as on a GPU).
MAP_ENV = "MLX_HARMONY_CORE_GGUF_MAP"
# Whether the mapping is populated at load (the file read, page tables filled, as llama.cpp
# does): without it decode faults on every first touch of a page (2.7x slower at first).
MAP_POPULATE = True
# Float types whose stored bytes are the loaded array: mapped as they are.
_MAPPED_FLOAT = {0: "float32", 1: "float16", 30: "bfloat16"}


def map_enabled() -> bool:
    """Whether :func:`load_gguf` maps the file (a CPU device, unless ``MLX_HARMONY_CORE_GGUF_MAP=0``)."""
    return os.environ.get(MAP_ENV, "1") != "0" and mx.default_device() == mx.cpu


def _block_modules(model: nn.Module, plan: list[tuple[str, TensorInfo]]) -> dict[str, nn.Module]:
    """The block-kernel layers replacing ``model``'s modules whose weights are Q8_0/MXFP4
    (path -> new layer); other modules load repacked. Dense linears inside a decoder block
    the CPU runs fused (:mod:`..cpu.block`) stay repacked: that primitive takes our layout."""
    from ..cpu.block import block_classes
    from ..cpu.fused import fused_enabled
    from ..cpu.gguf_blocks import BLOCK_TYPES, block_layer

    modules = dict(model.named_modules())
    fusable = tuple(block_classes()) if fused_enabled() else ()
    fused = [p + "." for p, m in modules.items() if fusable and isinstance(m, fusable)]
    out = {}
    for path, info in plan:
        module_path, _, leaf = path.rpartition(".")
        if leaf != "weight" or info.type not in BLOCK_TYPES or not info.shape:
            continue
        if info.shape[-1] % 32:
            continue
        if isinstance(modules.get(module_path), nn.Linear) and any(
            module_path.startswith(p) for p in fused
        ):
            continue
        raw = (*info.shape[:-1], info.shape[-1] // 32 * BLOCK_TYPES[info.type][1])
        layer = block_layer(modules.get(module_path), info.type, raw)
        if layer is not None:
            out[module_path] = layer
    return out


def _replace_modules(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for path, layer in layers.items():
        *parents, leaf = path.split(".")
        parent: Any = model
        for p in parents:
            parent = parent[int(p)] if isinstance(parent, list) else getattr(parent, p)
        if isinstance(parent, list):
            parent[int(leaf)] = layer
        else:
            setattr(parent, leaf, layer)


def _mapped_arrays(mapping: Any, info: TensorInfo, block: bool) -> dict[str, mx.array]:
    """``info``'s tensor as a view of the mapped file: floats as stored, block types as
    (..., row_bytes) uint8 rows of GGUF blocks."""
    from .. import _core

    if block:
        from ..cpu.gguf_blocks import BLOCK_TYPES

        shape = [*info.shape[:-1], info.shape[-1] // 32 * BLOCK_TYPES[info.type][1]]
        return {"": _core.gguf_mapped_array(mapping, info.offset, shape, "uint8")}
    return {
        "": _core.gguf_mapped_array(
            mapping, info.offset, list(info.shape), _MAPPED_FLOAT[info.type]
        )
    }


def _stream_weights(
    gguf: GGUFFile,
    plan: list[tuple[str, TensorInfo]],
    config: dict[str, Any],
    dequantize: bool,
    what: str = "loading",
    float_types: frozenset[int] = frozenset(),
    mapping: Any = None,
    block_paths: frozenset[str] = frozenset(),
    arena: Any = None,
) -> Iterator[dict[str, mx.array]]:
    """Each planned tensor's evaluated MLX arrays under mlx-lm names (``{path: weight}``,
    plus the module's ``scales``/``biases`` when quantized), one tensor at a time: the file
    is read with ``pread`` (never mapped), and nothing but the arrays yielded is kept.
    Quantized tensors load as float32 if ``dequantize`` or their type is in ``float_types``.
    With a ``mapping`` (a ``_core.GgufMapping`` of the file), float tensors and the weights at
    ``block_paths`` (block-kernel layers) are views of it instead: no copy, no read. The
    others are made in ``arena`` (a ``_core.WeightArena``) where one is given."""
    family = family_for(arch=gguf.architecture)
    fix = family.fix_tensor if family is not None else None
    progress = ProgressBar(
        sum(info.nbytes for _, info in plan), f"{what} {gguf.path.name}", min_total=BIG_FILE
    )
    try:
        with FileSource(gguf.path) as src:
            for path, info in plan:
                block = path in block_paths
                if mapping is not None and (block or info.type in _MAPPED_FLOAT):
                    arrays = _mapped_arrays(mapping, info, block)
                else:
                    arrays = read_tensor(gguf, src, info, arena)
                stem = info.name.rsplit(".", 1)[0]
                if fix is not None:
                    fixed = fix(stem, arrays, config, info.type in _FLOAT)
                    arrays = _written_back(arrays, fixed) if arena is not None else fixed
                if block:
                    pass  # stays in GGUF's blocks
                elif info.type in _QUANTIZED and (dequantize or info.type in float_types):
                    arrays = {"": dequantize_arrays(arrays, info.type)}
                mx.eval(arrays)
                module = path.rsplit(".", 1)[0]
                out = {path: arrays.pop("")}
                for k, v in arrays.items():
                    out[f"{module}.{k}"] = v
                del arrays
                yield out
                progress.update(info.nbytes)
    finally:
        progress.close()
        mx.clear_cache()


# Dtypes whose arrays numpy can view (bfloat16 has no buffer format).
_VIEWABLE = (mx.uint8, mx.uint32, mx.float16, mx.float32)


def _written_back(before: dict[str, mx.array], after: dict[str, mx.array]) -> dict[str, mx.array]:
    """A family fix's new arrays written into the memory of those they replace (same shape
    and dtype), so that the weights stay in the load's arena (huge pages) and the arena holds
    no dead copies."""
    out = {}
    for key, new in after.items():
        old = before.get(key)
        if (
            old is not None
            and new is not old
            and new.shape == old.shape
            and new.dtype == old.dtype
            and old.dtype in _VIEWABLE
        ):
            mx.eval(new)
            np.asarray(memoryview(old))[...] = np.asarray(memoryview(new))
            new = old
        out[key] = new
    return out


def dequantize_arrays(arrays: dict[str, mx.array], kind: int) -> mx.array:
    """A quantized tensor's MLX arrays (:func:`tensor_arrays`) as float32, computed in
    float32 (the stored scales are exact there): equal to the ``gguf`` package's dequantizer."""
    bits, group, mode = _QUANTIZED[kind]
    biases = arrays.get("biases")
    full = mx.dequantize(
        arrays[""],
        arrays["scales"] if mode == "mxfp4" else arrays["scales"].astype(mx.float32),
        biases.astype(mx.float32) if biases is not None else None,
        group_size=group,
        bits=bits,
        mode=mode,
    )
    return full.astype(mx.float32)


def _build_model(config: dict[str, Any]) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    return model_class(args_class.from_dict(config))


def _quantize(model: nn.Module, quantized: dict[str, tuple[int, int, str]]) -> None:
    def predicate(path: str, module: nn.Module) -> Any:
        spec = quantized.get(path)
        if spec is None or not hasattr(module, "to_quantized"):
            return False
        bits, group, mode = spec
        # MLX cannot quantize to groups of 16: made with 32, regrouped below.
        return {"bits": bits, "group_size": max(group, 32), "mode": mode}

    if quantized:
        nn.quantize(model, class_predicate=predicate)
        small = {p: s for p, s in quantized.items() if s[1] not in MLX_GROUPS}
        if small:
            from ..cpu.quant import use_small_groups

            use_small_groups(model, small)


def weight_bytes(gguf: GGUFFile, dequantize: bool = False) -> int:
    """Bytes the weights take in memory once loaded (MLX's layout: codes, scales and biases
    for quantized types), or with quantized ones as float32."""
    return sum(loaded_bytes(t, dequantize) for t in gguf.tensors.values())


def load_bytes(gguf: GGUFFile, dequantize: bool = False, keep: int | None = None) -> int:
    """The most memory a load takes: the weights kept (all of them, or ``keep`` bytes, as
    ``convert`` keeps one shard), one tensor being converted, and the file chunk read."""
    kept = weight_bytes(gguf, dequantize)
    if keep is not None:
        kept = min(kept, keep)
    tensors = list(gguf.tensors.values())
    largest = max(
        (loaded_bytes(t, dequantize) + (loaded_bytes(t) if dequantize else 0) for t in tensors),
        default=0,
    )
    chunk = min(CHUNK_BYTES, max((t.nbytes for t in tensors if t.type in _QUANTIZED), default=0))
    return kept + largest + 2 * chunk


def check_memory(
    gguf: GGUFFile,
    available: int | None = None,
    dequantize: bool = False,
    keep: int | None = None,
) -> None:
    """Refuse a model whose load cannot fit in the memory available now (see
    :func:`load_bytes`)."""
    from ..scheduler import available_memory

    free = available_memory() if available is None else available
    need = load_bytes(gguf, dequantize, keep)
    if need > 0.9 * free:
        raise ModelLoadError(
            f"{gguf.path.name} needs {need / 2**30:.1f} GiB to load "
            f"({weight_bytes(gguf, dequantize) / 2**30:.1f} GiB of weights), but only "
            f"{free / 2**30:.1f} GiB of memory are available; free memory or pick a smaller "
            "quantization" + (" (or load it without dequantize)" if dequantize else "")
        )


def load_gguf(
    path: str | os.PathLike[str], *, dequantize: bool = False, mapped: bool | None = None
) -> tuple[nn.Module, dict[str, Any], GGUFFile]:
    """Load a GGUF file into an mlx-lm model. Returns (model, config, header).

    ``mapped`` (default: :func:`map_enabled`, i.e. on a CPU device): the file is memory-mapped
    and float tensors and Q8_0/MXFP4 weights are views of it, computed on GGUF's own blocks
    (:mod:`mlx_harmony_core.cpu.gguf_blocks`); only other types are converted, into one
    arena of transparent huge pages (:data:`LOAD_ARENA`: fewer TLB misses while decode
    streams them). Otherwise
    tensor by tensor: each is read from the file, converted into its final MLX arrays and
    evaluated before the next is read, so the load peaks at about the loaded model plus
    one tensor. ``dequantize=True`` turns quantized weights into float32 (faster than
    MLX's CPU quantized kernels today, 8x the memory of 4-bit; never mapped).
    """
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    mapped = (map_enabled() if mapped is None else mapped) and not dequantize
    check_memory(gguf, dequantize=dequantize)
    model = _model_for(gguf, config)
    plan = _plan(gguf, model, config)
    quantized = {} if dequantize else _quantized_modules(plan)
    if not dequantize:
        config["quantization"] = quantization_config(quantized)
    blocks = _block_modules(model, plan) if mapped else {}
    _quantize(model, {p: q for p, q in quantized.items() if p not in blocks})
    _replace_modules(model, blocks)
    mapping = arena = None
    block_paths = frozenset(f"{p}.weight" for p in blocks)
    if mapped:
        from .. import _core

        mapping = _core.GgufMapping(str(gguf.path), populate=MAP_POPULATE)
        arena = _weight_arena(plan, block_paths)
    weights: dict[str, mx.array] = {}
    for arrays in _stream_weights(
        gguf, plan, config, dequantize, mapping=mapping, block_paths=block_paths, arena=arena
    ):
        weights.update(arrays)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise ModelLoadError(
            f"{gguf.path}: the tensors do not fit {config['model_type']}: {exc}"
        ) from exc
    del weights
    mx.eval(model.parameters())
    if blocks:
        logger.info(
            "%s: %d layers compute on the mapped file's GGUF blocks", gguf.path.name, len(blocks)
        )
    return model, config, gguf


# Whether the weights a CPU load converts are made in one arena of transparent huge pages
# (SmolLM2's tensors are each under a 2 MiB page: one by one none would get one).
LOAD_ARENA = True
# Bytes an array may take in the arena beyond its data (alignment and MLX's header).
_ARENA_SLACK = 128


def _weight_arena(plan: list[tuple[str, TensorInfo]], mapped: frozenset[str]) -> Any:
    """A ``_core.WeightArena`` for the tensors a mapped load converts (not the mapped floats
    nor the block-kernel weights), or ``None`` where this MLX build cannot make views."""
    from .. import _core

    if not (LOAD_ARENA and LOAD_HUGE_PAGES and _core.gguf_mapped_zero_copy()):
        return None
    need = sum(
        loaded_bytes(info) + 3 * _ARENA_SLACK
        for path, info in plan
        if path not in mapped and info.type not in _MAPPED_FLOAT
    )
    return _core.WeightArena(need) if need else None


def _model_for(gguf: GGUFFile, config: dict[str, Any]) -> nn.Module:
    try:
        return _build_model(config)
    except Exception as exc:
        raise ModelLoadError(
            f"{gguf.path}: mlx-lm cannot build {config['model_type']}: {exc}"
        ) from exc


def quantization_config(quantized: dict[str, tuple[int, int, str]]) -> dict[str, Any] | None:
    """mlx-lm's ``quantization`` entry: the commonest format, and each other path's own."""
    if not quantized:
        return None
    from collections import Counter

    (bits, group, mode), _ = Counter(quantized.values()).most_common(1)[0]
    out: dict[str, Any] = {"group_size": group, "bits": bits, "mode": mode}
    for p, spec in quantized.items():
        if spec != (bits, group, mode):
            out[p] = {"bits": spec[0], "group_size": spec[1], "mode": spec[2]}
    return out


# -- saving as an mlx-lm directory --------------------------------------------------------------


def save_mlx(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dequantize: bool = False,
    overwrite: bool = False,
    shard_bytes: int = 2 * 2**30,
) -> Path:
    """Convert a GGUF file into an mlx-lm model directory (config.json, safetensors and the
    Hugging Face tokenizer files) that ``mlx_lm.load`` and :func:`~.load` read.

    Streams like :func:`load_gguf`: tensors are converted one at a time and written out in
    shards of about ``shard_bytes`` (``model-0000i-of-0000n.safetensors`` with an index;
    ``model.safetensors`` if one shard holds all), so at most one shard is held."""
    from mlx.utils import tree_flatten

    from .._paths import atomic_write_text

    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True")
    gguf = read_gguf(path)
    config = gguf_config(gguf)
    check_memory(gguf, dequantize=dequantize, keep=shard_bytes)
    model = _model_for(gguf, config)
    plan = _plan(gguf, model, config)
    # mlx-lm runs MLX's quantized matmul, which has no groups of 16: those types (Q2_K, Q3_K,
    # Q6_K) are written as float32, which holds them exactly.
    float_types = frozenset(k for k, s in _QUANTIZED.items() if s[1] not in MLX_GROUPS)
    quantized = {} if dequantize else _quantized_modules(plan, exclude=float_types)
    config["quantization"] = quantization_config(quantized)
    _quantize(model, quantized)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    del model
    # Shards planned from the header, so each file is named with their count.
    shard_of, size, n = [], 0, 0
    for _, info in plan:
        if size >= shard_bytes:
            n, size = n + 1, 0
        shard_of.append(n)
        size += loaded_bytes(info, dequantize or info.type in float_types)
    count = n + 1
    names = (
        ["model.safetensors"]
        if count == 1
        else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    )
    target.mkdir(parents=True, exist_ok=True)
    # The tokenizer first: building it is a passing peak of its own, not added to a shard's.
    family = family_for(arch=gguf.architecture)
    if family is not None and family.write_tokenizer is not None:
        family.write_tokenizer(target)  # the family's own (GPT-OSS: Harmony's)
    else:
        tokenizer = gguf_tokenizer(gguf)
        tokenizer.save_pretrained(str(target))
        extra = {"eos_token_id": eos_ids(gguf, tokenizer)}
        atomic_write_text(target / "generation_config.json", json.dumps(extra) + "\n")
    index: dict[str, str] = {}
    shard: dict[str, mx.array] = {}
    current = 0
    arrays_in_order = _stream_weights(
        gguf, plan, config, dequantize, what="converting", float_types=float_types
    )
    for i, arrays in enumerate(arrays_in_order):
        if shard_of[i] != current:
            _write_shard(target / names[current], shard, index)
            shard, current = {}, shard_of[i]
            mx.clear_cache()  # the written shard's memory goes back, not to MLX's cache
        for name, a in arrays.items():
            if expected.get(name) != tuple(a.shape):
                raise ModelLoadError(
                    f"{gguf.path}: the tensors do not fit {config['model_type']}: {name} is "
                    f"{tuple(a.shape)}, the model expects {expected.get(name, 'no such name')}"
                )
        shard.update(arrays)
    _write_shard(target / names[current], shard, index)
    missing = sorted(set(expected) - set(index))
    if missing:
        raise ModelLoadError(
            f"{gguf.path}: the tensors do not fit {config['model_type']}: "
            f"{len(missing)} parameters are missing ({missing[0]}, ...)"
        )
    if count > 1:
        total = sum(loaded_bytes(info, dequantize or info.type in float_types) for _, info in plan)
        atomic_write_text(
            target / "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1) + "\n",
        )
    if config.get("quantization") is None:
        config.pop("quantization", None)
    atomic_write_text(target / "config.json", json.dumps(config, indent=2) + "\n")  # last
    return target


def _write_shard(file: Path, shard: dict[str, mx.array], index: dict[str, str]) -> None:
    mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})
    index.update(dict.fromkeys(shard, file.name))
    logger.info("wrote %s (%d arrays)", file.name, len(shard))
