"""The built-in tools' flags of ``chat`` and ``serve``: one flag per field of
:class:`~mlx_harmony_core.tools.options.BuiltinToolOptions` (name, type, bounds, default
and help from the schema), so no limit is written twice."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from ..options import MAX_TOOL_CALLS


def _tool_options_schema() -> Any:
    from ..tools.options import BuiltinToolOptions

    return BuiltinToolOptions


def tool_names(text: str) -> list[str]:
    """``--tools python,browser`` (or ``python browser``) as the tools' names, checked."""
    from ..tools.builtin import BUILTIN_TOOL_NAMES

    names = [n.strip() for n in text.replace(" ", ",").split(",") if n.strip()]
    for name in names:
        if name not in BUILTIN_TOOL_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown built-in tool {name!r}; choose from {', '.join(BUILTIN_TOOL_NAMES)}"
            )
    return names


def add_tool_flags(p: argparse.ArgumentParser, *, loop: bool = True) -> None:
    """``--tools`` and ``--max-tool-calls`` (``loop``; ``serve`` has them from its
    options), then one flag per :class:`BuiltinToolOptions` field."""
    schema = _tool_options_schema()
    g = p.add_argument_group(
        "built-in tools (GPT-OSS's python and browser; off unless --tools names them)"
    )
    if loop:
        g.add_argument(
            "--tools",
            type=tool_names,
            default=None,
            help="built-in tools the model may call: python, browser (comma-separated)",
        )
        g.add_argument(
            "--max-tool-calls",
            type=int,
            default=None,
            help=f"built-in tool calls run per reply (default {MAX_TOOL_CALLS})",
        )
    for name, field in schema.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kind = _kind(field.annotation)
        help_text = field.description or ""
        if field.default is not None and "default" not in help_text:
            help_text += f" (default: {field.default})"
        if kind is bool:
            g.add_argument(flag, action="store_true", default=None, help=field.description)
        else:
            g.add_argument(flag, type=kind, default=None, help=help_text)


def _kind(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = args[0] if args else annotation
    return kind if kind in (int, float, bool, Path) else str


def tool_options(args: argparse.Namespace) -> Any:
    """The :class:`BuiltinToolOptions` the flags give (bad values: a message naming the
    flag, as a ``ValueError``)."""
    from pydantic import ValidationError

    schema = _tool_options_schema()
    given = {
        name: getattr(args, name)
        for name in schema.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return schema(**given)
    except ValidationError as exc:
        e = exc.errors()[0]
        name = str(e["loc"][0]) if e["loc"] else "options"
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{flag}: {e['msg']}") from None
