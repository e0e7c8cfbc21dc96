"""Write K-quant SmolLM2-135M GGUFs with llama.cpp's own quantizer (needs llama-cpp-python).

    python benchmarks/make_kquant_smollm2.py [OUT_DIR]

The float model comes from the Q4_1 file the tests use (its values dequantized to F32 with
the ``gguf`` package), quantized by ``llama_model_quantize`` to Q4_K_M and Q6_K. The files
are what the real-model tests of tests/test_gguf_kquants.py and bench_kquant.py read.
"""

from __future__ import annotations

import logging
import os
import sys
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


def main(argv: list[str]) -> int:
    from mlx_harmony_core.models.real_models import fetch_test_model

    logging.basicConfig(level=logging.INFO)
    src = fetch_test_model("smollm2")
    out_dir = Path(argv[1]) if len(argv) > 1 else src.parent
    f32 = out_dir / "SmolLM2-135M-Instruct.F32.gguf"
    if not f32.exists():
        float_gguf(src, f32)
    for ftype in FTYPES:
        target = out_dir / f"SmolLM2-135M-Instruct.{ftype}.gguf"
        if not target.exists():
            quantize(f32, target, ftype)
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
