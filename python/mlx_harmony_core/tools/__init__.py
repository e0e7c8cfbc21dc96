"""Tools the model can call: function tools the caller runs (:mod:`.functions`) and, later in
this package, the built-in ``python`` and ``browser`` tools the engine runs itself."""

from .functions import Tool, ToolLoopResult, run_tool_loop

__all__ = ["Tool", "ToolLoopResult", "run_tool_loop"]
