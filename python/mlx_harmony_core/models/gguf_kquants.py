"""llama.cpp's K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and 5-bit legacy types (Q5_0, Q5_1) as
MLX affine quantization, exactly.

Every one of these formats is ``w = scale * q + bias`` per group of 16 or 32 weights with an
unsigned code ``q``, once its sub-block scales are multiplied out:

=======  =====  =====  ========================  ====================  ===============
type     bits   group  scale                     bias                  scale dtype
=======  =====  =====  ========================  ====================  ===============
Q5_0     5      32     d                         -16 d                 float16
Q5_1     5      32     d                         m                     float16
Q2_K     2      16     d * (sc & 15)             -dmin * (sc >> 4)     float32
Q3_K     3      16     d * (sc - 32)             -4 * scale            float32
Q4_K     4      32     d * sc                    -dmin * m             float32
Q5_K     5      32     d * sc                    -dmin * m             float32
Q6_K     6      16     d * sc                    -32 * scale           float32
=======  =====  =====  ========================  ====================  ===============

``d``/``dmin``/``m`` are float16 and the sub-block scales are integers of at most 8 bits, so
each scale and bias is exact in the dtype listed (float16 ones: products by powers of two),
``scale * q`` is exact in float32 and the sum rounds once: ``mx.dequantize`` in float32 gives
bit for bit what the ``gguf`` package's dequantizer (llama.cpp's reference) gives. MLX's
quantized matmul takes groups of 32, 64 and 128 only: the group-16 types (Q2_K, Q3_K, Q6_K)
run on our CPU kernels, or as ``mx.dequantize`` then a matmul elsewhere.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KQUANTS", "QK_K", "decode", "pack_bits"]

QK_K = 256

# GGML type -> (bits, group size, scale dtype) in MLX's affine layout.
KQUANTS: dict[int, tuple[int, int, type]] = {
    6: (5, 32, np.float16),  # Q5_0
    7: (5, 32, np.float16),  # Q5_1
    10: (2, 16, np.float32),  # Q2_K
    11: (3, 16, np.float32),  # Q3_K
    12: (4, 32, np.float32),  # Q4_K
    13: (5, 32, np.float32),  # Q5_K
    14: (6, 16, np.float32),  # Q6_K
}


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (..., n), n a multiple of 8, as MLX packs them: a little-endian bit
    stream, value i at bits [bits * i, bits * (i + 1)); returns uint8 (..., n * bits // 8)."""
    lead, n = codes.shape[:-1], codes.shape[-1]
    q = codes.reshape(-1, n // 8, 8).astype(np.uint64)
    word = np.zeros(q.shape[:-1], np.uint64)
    for i in range(8):
        word |= q[..., i] << np.uint64(bits * i)
    packed = word.view(np.uint8).reshape(*word.shape, 8)[..., :bits]
    return packed.reshape(*lead, n * bits // 8)


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of each block, as float32 (n, 1)."""
    return raw[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins: (n, 8) each."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _shifted(a: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """(n, k, w) -> (n, k, len(shifts), w): each byte shifted by each shift, masked."""
    sh = np.array(shifts, np.uint8).reshape(1, 1, -1, 1)
    return (a[:, :, None, :] >> sh) & np.uint8(mask)


def decode(kind: int, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of GGML type ``kind`` (``raw``: uint8 (n, bytes per block)) as MLX affine
    parts: codes uint8 (n, block), scales and biases (n, block // group) in the type's scale
    dtype (see the module's table)."""
    n = raw.shape[0]
    f32 = np.float32
    if kind in (6, 7):  # Q5_0: d, qh[4], qs[16]; Q5_1: d, m, qh[4], qs[16]
        d = _f16(raw, 0)
        o = 2 if kind == 6 else 4
        qh = raw[:, o : o + 4].copy().view("<u4")
        ql = _shifted(raw[:, None, o + 4 : o + 20], [0, 4], 0x0F).reshape(n, 32)
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = ql | (hi << np.uint8(4))
        bias = d * f32(-16) if kind == 6 else _f16(raw, 2)
        return codes, d.astype(np.float16), bias.astype(np.float16)
    if kind == 10:  # Q2_K: scales[16], qs[64], d, dmin
        sc = raw[:, :16]
        d, dmin = _f16(raw, 80), _f16(raw, 82)
        codes = _shifted(raw[:, 16:80].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
        scale = d * (sc & 0x0F).astype(f32)
        bias = -(dmin * (sc >> 4).astype(f32))
        return codes, scale, bias
    if kind == 11:  # Q3_K: hmask[32], qs[64], scales[12], d
        d = _f16(raw, 108)
        packed = raw[:, 96:108]
        lo = _shifted(packed[:, None, :8], [0, 4], 0x0F).reshape(n, 16)
        hi = _shifted(packed[:, None, 8:12], [0, 2, 4, 6], 0x03).reshape(n, 16)
        sc = (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
        ql = _shifted(raw[:, 32:96].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
        qh = _shifted(raw[:, None, :32], list(range(8)), 1).reshape(n, QK_K)
        # llama.cpp subtracts 4 where the hmask bit is 0: q = ql + 4 * bit - 4
        codes = ql | (qh << np.uint8(2))
        scale = d * sc.astype(f32)
        return codes, scale, scale * f32(-4)
    if kind in (12, 13):  # Q4_K: d, dmin, scales[12], qs[128]; Q5_K: ... qh[32], qs[128]
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        sc, mn = _scale_min_k4(raw[:, 4:16])
        qs = raw[:, 16:144] if kind == 12 else raw[:, 48:176]
        codes = _shifted(qs.reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, QK_K)
        if kind == 13:
            qh = _shifted(raw[:, None, 16:48], list(range(8)), 1).reshape(n, QK_K)
            codes = codes | (qh << np.uint8(4))
        return codes, d * sc.astype(f32), -(dmin * mn.astype(f32))
    if kind == 14:  # Q6_K: ql[128], qh[64], scales[16] (int8), d
        d = _f16(raw, 208)
        ql = _shifted(raw[:, :128].reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, QK_K)
        qh = _shifted(raw[:, 128:192].reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
        codes = ql | (qh << np.uint8(4))
        scale = d * raw[:, 192:208].view(np.int8).astype(f32)
        return codes, scale, scale * f32(-32)
    raise ValueError(f"GGML type {kind} is not a K-quant or 5-bit legacy type")
