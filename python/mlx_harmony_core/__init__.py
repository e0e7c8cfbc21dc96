"""mlx-harmony-core: a fast, correct inference core for GPT-OSS and other mlx-lm models on MLX.

Import order matters: on Linux OpenBLAS is loaded before ``mlx.core`` so MLX's matrix
products reach it, ``mlx.core`` registers ``mx.array`` with nanobind before ``_core`` loads,
and the shipped o200k vocabulary is put in place before ``openai_harmony`` needs it.
"""

from __future__ import annotations

from . import _blas
from ._vocab import ensure_vocab_env

_blas.enable()
ensure_vocab_env()

import mlx.core  # noqa: E402,F401  (must precede _core)

from . import _core  # noqa: E402,F401
from .chat_log import ChatLog, ChatLogError  # noqa: E402
from .config import (  # noqa: E402
    Example,
    PromptConfig,
    SamplingParams,
    load_profile,
    load_prompt_config,
    resolve_settings,
)
from .engine import Completion, Engine, StreamEvent, Timings, Usage  # noqa: E402
from .harmony import HarmonyStream, ToolCall, load_encoding, render_prompt  # noqa: E402
from .kv_cache import (  # noqa: E402
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_cache,
    make_cache,
    save_cache,
)
from .loading import ModelLoadError, load, load_model, make_test_model  # noqa: E402
from .sampling import LogProbs, Sampler  # noqa: E402
from .stopping import Detokenizer, StopStrings, TokenStops  # noqa: E402
from .tools import Tool, ToolLoopResult, run_tool_loop  # noqa: E402


def backend_info() -> dict[str, object]:
    """MLX version and device, which BLAS MLX's CPU calls reach, and its threads."""
    import mlx.core as mx

    return {"mlx": mx.__version__, "device": str(mx.default_device()), **_blas.info()}


__version__ = "0.1.0"

__all__ = [
    "ChatLog",
    "ChatLogError",
    "Example",
    "PromptConfig",
    "load_profile",
    "load_prompt_config",
    "resolve_settings",
    "Tool",
    "ToolLoopResult",
    "run_tool_loop",
    "Completion",
    "KVCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "load_cache",
    "make_cache",
    "save_cache",
    "backend_info",
    "Detokenizer",
    "LogProbs",
    "StopStrings",
    "TokenStops",
    "Engine",
    "HarmonyStream",
    "ModelLoadError",
    "Sampler",
    "SamplingParams",
    "StreamEvent",
    "Timings",
    "ToolCall",
    "Usage",
    "load",
    "load_encoding",
    "load_model",
    "make_test_model",
    "render_prompt",
]
