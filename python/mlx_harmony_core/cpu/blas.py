"""Route MLX's CPU matrix products to an optimized OpenBLAS on Linux.

The ``mlx-cpu`` wheel links netlib's reference BLAS, which runs GEMM on one core at a few
GFLOP/s. ``scipy-openblas32`` ships OpenBLAS with ``scipy_``-prefixed symbols; our shim
library exports the standard ``cblas_{s,d,c}gemm`` names and forwards to them. Both are loaded
with ``RTLD_GLOBAL`` *before* ``mlx.core``, so libmlx's references bind to the shim.
``MLX_HARMONY_CORE_BLAS=reference`` turns this off; OpenBLAS's usual variables
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``) set its threads, ``OPENBLAS_THREAD_TIMEOUT``
how long its idle threads spin (default here 4: 2^4 cycles, then they sleep).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_state: dict[str, object] = {"blas": "reference", "reason": "not attempted"}
_libs: dict[str, ctypes.CDLL] = {}


def _openblas_path() -> Path | None:
    spec = importlib.util.find_spec("scipy_openblas32")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib" / "libscipy_openblas.so"
    return lib if lib.exists() else None


def enable() -> None:
    """Load OpenBLAS and the shim globally, if possible; never raises."""
    if _libs or sys.platform != "linux":
        _state["reason"] = _state["reason"] if _libs else "not Linux: MLX uses the platform BLAS"
        return
    if os.environ.get("MLX_HARMONY_CORE_BLAS", "").lower() == "reference":
        _state["reason"] = "MLX_HARMONY_CORE_BLAS=reference"
        return
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx.core was imported before mlx_harmony_core"
        logger.warning(
            "mlx.core was imported before mlx_harmony_core, so MLX keeps its slow reference BLAS; "
            "import mlx_harmony_core first for ~30x faster CPU matrix products"
        )
        return
    core = importlib.util.find_spec("mlx_harmony_core._core")  # the shim is installed beside it
    # In lib/ (not a package), so help() and pkgutil do not list it as a module.
    shim = (
        Path(core.origin).parent / "lib" / "libmhc_blas_shim.so" if core and core.origin else Path()
    )
    openblas = _openblas_path()
    if openblas is None or not shim.exists():
        _state["reason"] = "scipy-openblas32 or the shim library is not installed"
        return
    # OpenBLAS's idle workers spin ~2^28 cycles (~0.1 s) after each GEMM, on the cores our
    # kernel pool then needs (a prompt's attention, SwiGLU): let them sleep after 2^4 cycles
    # (SmolLM2 prefill +8%, 4 alternating rounds), unless the user chose. Read at load.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        _libs["openblas"] = ctypes.CDLL(str(openblas), mode=ctypes.RTLD_GLOBAL)
        _libs["shim"] = ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        _state["reason"] = f"could not load OpenBLAS: {exc}"
        logger.warning("falling back to MLX's reference BLAS: %s", exc)
        return
    _state.update(
        blas="openblas", reason="scipy-openblas32 via the mlx-harmony-core shim", path=str(openblas)
    )


def shim_calls() -> int:
    """GEMM calls that went through the shim (0 when it is off)."""
    shim = _libs.get("shim")
    if shim is None:
        return 0
    fn = shim.mhc_blas_shim_calls
    fn.restype = ctypes.c_long
    return int(fn())


def info() -> dict[str, object]:
    """Which BLAS MLX's CPU calls reach, why, and with how many threads."""
    out = dict(_state)
    lib = _libs.get("openblas")
    if lib is not None:
        lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
        lib.scipy_openblas_get_config.restype = ctypes.c_char_p
        out["threads"] = int(lib.scipy_openblas_get_num_threads())
        out["config"] = lib.scipy_openblas_get_config().decode()
    else:
        out["threads"] = 1
    return out
