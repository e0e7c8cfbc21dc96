"""Function tools: declaring them from JSON schemas or Python functions, and the tool loop."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import create_model

from ..messages import MessagesLike, normalize_messages, tool_specs

logger = logging.getLogger(__name__)


@dataclass
class Tool:
    """A function the model may call: its name, description, JSON-schema parameters and,
    for :func:`run_tool_loop`, the Python callable that runs it (called with keyword args)."""

    name: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    description: str = ""
    fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        tool_specs([self])  # validates the name and schema

    @classmethod
    def from_function(
        cls, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
    ) -> Tool:
        """Schema from the signature's type hints, description from the docstring."""
        fields: dict[str, Any] = {}
        for pname, p in inspect.signature(fn).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{fn.__name__}: *args / **kwargs cannot be described to a model")
            annotation = Any if p.annotation is p.empty else p.annotation
            fields[pname] = (annotation, ... if p.default is p.empty else p.default)
        schema = create_model(f"{fn.__name__}_args", **fields).model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        doc = inspect.getdoc(fn) or ""
        return cls(name or fn.__name__, schema, description or doc.split("\n\n")[0], fn)

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    def run(self, arguments: str) -> str:
        """Call the function with the model's JSON arguments; the result as text.

        Errors (invalid JSON, a raising function) are returned as text for the model to
        read, as a tool would report them, and logged.
        """
        if self.fn is None:
            raise ValueError(f"tool {self.name!r} has no Python function to run")
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            return f"error: the arguments are not valid JSON ({exc})"
        if not isinstance(args, dict):
            return "error: the arguments must be a JSON object"
        try:
            result = self.fn(**args)
        except Exception as exc:  # the model reads the error, as from any real tool
            logger.info("tool %s failed: %s", self.name, exc)
            return f"error: {type(exc).__name__}: {exc}"
        if isinstance(result, str):
            return result
        return json.dumps(result, ensure_ascii=False, default=str)


@dataclass
class ToolLoopResult:
    """The last completion, the whole conversation, and how many generations ran."""

    completion: Any
    messages: list[Any]
    rounds: int


def run_tool_loop(
    engine: Any,
    messages: MessagesLike,
    tools: Iterable[Tool | Callable[..., Any]],
    params: Any = None,
    *,
    max_rounds: int = 8,
    on_call: Callable[[Any, str], None] | None = None,
    **options: Any,
) -> ToolLoopResult:
    """Generate; while the model calls tools, run them and generate again.

    Stops at a reply that calls no tool, or after ``max_rounds`` generations (then the last
    completion's ``finish_reason`` is still ``tool_calls``). ``on_call(call, result)`` is told
    of each call. ``options`` go to :meth:`Engine.generate`.
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be >= 1")
    table: dict[str, Tool] = {}
    for t in tools:
        tool = t if isinstance(t, Tool) else Tool.from_function(t)
        table[tool.name] = tool
    declared = [t.to_openai() for t in table.values()]
    convo: list[Any] = list(normalize_messages(messages))
    completion = None
    for rounds in range(1, max_rounds + 1):
        completion = engine.generate(convo, params, tools=declared, **options)
        reply: dict[str, Any] = {"role": "assistant", "content": completion.text or None}
        if completion.reasoning:
            reply["reasoning"] = completion.reasoning
        if completion.tool_calls:
            reply["tool_calls"] = [vars(c).copy() for c in completion.tool_calls]
        convo.append(reply)
        if completion.finish_reason != "tool_calls":
            return ToolLoopResult(completion, convo, rounds)
        for call in completion.tool_calls:
            tool = table.get(call.name)
            result = (
                tool.run(call.arguments)
                if tool is not None
                else f"error: there is no tool named {call.name!r}; available: {sorted(table)}"
            )
            if on_call is not None:
                on_call(call, result)
            convo.append(
                {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
            )
    logger.warning("tool loop stopped after %d rounds with calls still pending", max_rounds)
    return ToolLoopResult(completion, convo, max_rounds)
