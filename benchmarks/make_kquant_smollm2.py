"""Write K-quant SmolLM2-135M GGUFs with llama.cpp's own quantizer (needs llama-cpp-python).

    python benchmarks/make_kquant_smollm2.py [OUT_DIR]   # default: the real models' cache

Q4_K_M and Q6_K, from the Q4_1 file's values (see :mod:`mlx_harmony_core.models.llama_quantize`):
what tests/test_gguf_kquants.py and bench_kquant.py compare with llama.cpp.
"""

from __future__ import annotations

import logging
import sys

from mlx_harmony_core.models.llama_quantize import FTYPES, kquant_smollm2


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO)
    for ftype in FTYPES:
        print(kquant_smollm2(ftype, argv[1] if len(argv) > 1 else None))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
