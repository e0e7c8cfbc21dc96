"""mlx-harmony-core: a fast, correct inference core for GPT-OSS and other mlx-lm models on MLX.

Import order matters: on Linux OpenBLAS is loaded before ``mlx.core`` so MLX's matrix
products reach it, and ``mlx.core`` registers ``mx.array`` with nanobind before ``_core``
loads. Importing writes no file: the shipped o200k vocabulary is unpacked on first use.
"""

from .cpu import blas as _blas

_blas.enable()

import mlx.core as _mx  # noqa: E402  (must precede _core)

from . import (  # noqa: E402,F401  (mhc.distributed.init())
    _core,  # noqa: E402,F401
    distributed,
    gguf,  # mhc.gguf, mhc.loading, mhc.real_models: the old paths, kept for one release
    loading,
    real_models,
)
from ._version import __version__  # noqa: E402
from .chat_format import ChatFormat, ChatTemplateFormat  # noqa: E402
from .chat_log import ChatLog, ChatLogError  # noqa: E402
from .config import (  # noqa: E402
    Example,
    PromptConfig,
    load_profile,
    load_prompt_config,
    resolve_settings,
)
from .cpu import quant  # noqa: E402  (mhc.quant)
from .engine import Engine  # noqa: E402
from .errors import (  # noqa: E402
    CapacityError,
    ContextLengthError,
    InvalidRequestError,
    ModelLoadError,
    RequestTypeError,
)
from .harmony import HarmonyFormat, HarmonyStream, load_encoding, render_prompt  # noqa: E402
from .kv_cache import (  # noqa: E402
    BatchKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_cache,
    make_cache,
    save_cache,
)
from .messages import ToolCall  # noqa: E402
from .models.builder import make_test_model  # noqa: E402
from .models.gguf import read_gguf, save_mlx  # noqa: E402
from .models.load import is_gguf, load, load_model  # noqa: E402
from .models.real_models import fetch_test_model  # noqa: E402
from .options import RequestOptions  # noqa: E402
from .params import SamplingParams  # noqa: E402
from .request import Completion, Request, StreamEvent, Timings, Usage  # noqa: E402
from .runner import ModelRunner  # noqa: E402
from .sampling import LogProbs, Sampler, pack_mask, sample_rows  # noqa: E402
from .scheduler import Handle, Scheduler  # noqa: E402
from .stopping import Detokenizer, StopStrings, TokenStops  # noqa: E402
from .tools import Tool, ToolLoopResult, run_tool_loop  # noqa: E402


def backend_info() -> dict[str, object]:
    """MLX version and device, which BLAS MLX's CPU calls reach (and its threads), and which
    quantized matmul kernels run."""
    group = distributed.current()
    return {
        "mlx": _mx.__version__,
        "device": str(_mx.default_device()),
        **_blas.info(),
        **quant.info(),
        "distributed": group.info() if group is not None else None,
    }


__all__ = [
    "BatchKVCache",
    "CapacityError",
    "ChatFormat",
    "ChatLog",
    "ChatLogError",
    "ChatTemplateFormat",
    "Completion",
    "ContextLengthError",
    "Detokenizer",
    "Engine",
    "Example",
    "HarmonyFormat",
    "Handle",
    "HarmonyStream",
    "InvalidRequestError",
    "KVCache",
    "LogProbs",
    "ModelLoadError",
    "ModelRunner",
    "PromptConfig",
    "QuantizedKVCache",
    "Request",
    "RequestOptions",
    "RequestTypeError",
    "RotatingKVCache",
    "Sampler",
    "SamplingParams",
    "Scheduler",
    "StopStrings",
    "StreamEvent",
    "Timings",
    "TokenStops",
    "Tool",
    "ToolCall",
    "ToolLoopResult",
    "Usage",
    "__version__",
    "backend_info",
    "load",
    "is_gguf",
    "read_gguf",
    "save_mlx",
    "fetch_test_model",
    "load_cache",
    "load_encoding",
    "load_model",
    "load_profile",
    "load_prompt_config",
    "make_cache",
    "make_test_model",
    "pack_mask",
    "render_prompt",
    "resolve_settings",
    "run_tool_loop",
    "sample_rows",
    "save_cache",
]
