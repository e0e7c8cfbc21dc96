"""K-quant GGUFs made by llama.cpp's own quantizer (``llama_model_quantize`` from the optional
``llama-cpp-python``), for tests and benchmarks that compare with llama.cpp.

The only real weights here are the Q4_1 SmolLM2 (:mod:`.real_models`): its values are
dequantized to an F32 GGUF with the ``gguf`` package, then quantized by llama.cpp to Q4_K_M
or Q6_K, as ``llama-quantize`` would.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# llama.cpp's llama_ftype values.
FTYPES = {"Q4_K_M": 15, "Q6_K": 18}


def float_gguf(src: Path, out: Path) -> Path:
    """``src`` with every tensor dequantized to F32 (metadata copied)."""
    import gguf
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            w.add_key_value(name, field.contents(), kind, sub_type=field.types[-1])
        else:
            w.add_key_value(name, field.contents(), kind)
    w.add_file_type(0)  # all F32
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def quantize(src: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's ``llama_model_quantize`` of ``src`` to ``ftype`` (a key of FTYPES)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) failed with {rc}")
    os.replace(tmp, out)
    return out


def kquant_smollm2(ftype: str, directory: str | os.PathLike[str] | None = None) -> Path:
    """llama.cpp's ``ftype`` (``Q4_K_M``, ``Q6_K``) SmolLM2-135M-Instruct, made once (~1 min)
    in ``directory`` (default: the real models' cache) and reused after."""
    from .real_models import cache_dir, fetch_test_model

    if ftype not in FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; choose one of {sorted(FTYPES)}")
    out_dir = Path(directory) if directory is not None else cache_dir()
    target = out_dir / f"SmolLM2-135M-Instruct.{ftype}.gguf"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "SmolLM2-135M-Instruct.F32.gguf"
    made = not f32.is_file()
    if made:
        float_gguf(fetch_test_model("smollm2"), f32)
    try:
        return quantize(f32, target, ftype)
    finally:
        if made:  # 540 MB: only the quantized file is kept
            f32.unlink()
