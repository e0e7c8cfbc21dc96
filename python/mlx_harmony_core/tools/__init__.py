"""Tools the model can call: function tools the caller runs (:mod:`.functions`) and the
built-in ``python`` and ``browser`` tools the engine runs itself (:mod:`.builtin`)."""

from .builtin import BUILTIN_TOOL_NAMES, BuiltinToolOptions, BuiltinTools, ToolCall, ToolResult
from .functions import Tool, ToolLoopResult, run_tool_loop

__all__ = [
    "BUILTIN_TOOL_NAMES",
    "BuiltinToolOptions",
    "BuiltinTools",
    "Tool",
    "ToolCall",
    "ToolLoopResult",
    "ToolResult",
    "run_tool_loop",
]
