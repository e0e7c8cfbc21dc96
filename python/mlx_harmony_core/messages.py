"""Chat messages and tools as OpenAI clients send them, validated for any chat format."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError, RequestTypeError

# A chat as text, OpenAI-style dicts, or a format's own message objects (passed through).
MessagesLike = str | Sequence[Any]
ToolChoice = str | Mapping[str, Any] | None

ROLES = ("system", "developer", "user", "assistant", "tool")
# How deeply a JSON Schema (a tool's parameters, a response format) may nest, in objects and
# arrays: far more than any real schema, and far below Python's recursion limit, which the
# schema checks and the renderers would otherwise hit.
MAX_SCHEMA_DEPTH = 64
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolCall:
    """A function call the model asked for."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as JSON (raises ``ValueError`` if the model wrote invalid JSON)."""
        return json.loads(self.arguments)


@dataclass
class ToolSpec:
    """A function tool: name, description and JSON Schema of its arguments; ``strict``
    tools get their calls' arguments constrained to that schema."""

    name: str
    description: str
    parameters: dict[str, Any] | None
    strict: bool = False


def check_text(text: str, where: str, *, param: str | None = None) -> str:
    """``text`` if it is valid Unicode; a clear error for lone surrogates (which also stand
    for undecodable bytes of a command-line argument). ``param``: the request field, for
    the error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        code = ord(bad)
        what = (
            f"the byte 0x{code - 0xDC00:02x}, which is not valid UTF-8"
            if 0xDC80 <= code <= 0xDCFF
            else f"an unpaired surrogate U+{code:04X}"
        )
        raise InvalidRequestError(
            f"{where} has {what} at character {exc.start}; send valid UTF-8 / Unicode text",
            param=param,
        ) from None
    return text


def check_strings(value: Any, where: str) -> None:
    """Check every string in ``value`` (keys too, at any depth) with :func:`check_text`:
    the one surrogate check for what reaches a renderer (messages, tools). The error names
    the string's path (``where`` and the keys and indexes down to it)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            check_text(node, path, param=path)
        elif isinstance(node, Mapping):
            for key, item in node.items():
                if isinstance(key, str):
                    check_text(key, f"a key of {path}", param=path)
                stack.append((item, f"{path}.{key}"))
        elif isinstance(node, (list, tuple)):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node))


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays (a scalar is 0); without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if depth > MAX_SCHEMA_DEPTH:
            break  # enough to refuse it
        stack.extend((child, depth) for child in children)
    return deepest


def check_schema_depth(schema: Any, where: str) -> None:
    """Raise :class:`InvalidRequestError` (``param`` = ``where``) when ``schema`` nests
    deeper than :data:`MAX_SCHEMA_DEPTH`."""
    if json_depth(schema) > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"{where} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep",
            param=where,
        )


def is_message_object(m: Any) -> bool:
    """A chat format's own message object (e.g. an openai_harmony ``Message``)."""
    return hasattr(m, "author") and hasattr(m, "content") and not isinstance(m, Mapping)


def normalize_messages(messages: MessagesLike) -> list[Any]:
    """Accept a prompt string, OpenAI-style dicts or a format's message objects.

    Assistant dicts may carry ``reasoning`` (or ``reasoning_content``) and OpenAI-style
    ``tool_calls``; tool dicts a ``tool_call_id`` and/or ``name``.
    """
    if isinstance(messages, str):
        return [{"role": "user", "content": check_text(messages, "the prompt")}]
    if not isinstance(messages, Sequence) or isinstance(messages, bytes):
        raise RequestTypeError("messages must be a string or a list of {'role', 'content'} dicts")
    out: list[Any] = []
    for i, m in enumerate(messages):
        if is_message_object(m):
            out.append(m)
            continue
        if not isinstance(m, Mapping):
            raise RequestTypeError(f"messages[{i}] must be a dict with 'role' and 'content'")
        check_strings(m, f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}] has role {role!r}; expected one of {sorted(ROLES)}"
            )
        content = m.get("content")
        if content is None and not (role == "assistant" and m.get("tool_calls")):
            raise InvalidRequestError(f"messages[{i}] ({role}) has no 'content'")
        if isinstance(content, list):  # OpenAI content parts: only text can be honoured
            content = _text_parts(content, i)
        if content is not None and not isinstance(content, str):
            raise RequestTypeError(f"messages[{i}].content must be a string")
        item = {**m, "content": content}
        if role == "assistant" and item.get("tool_calls") is not None:
            item["tool_calls"] = [_tool_call_dict(c, i) for c in item["tool_calls"]]
        out.append(item)
    return out


def role(m: Any) -> str:
    """The role of a normalized message."""
    return m["role"] if isinstance(m, Mapping) else str(m.author.role.value)


def _text_parts(parts: list[Any], i: int) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(
                f"messages[{i}].content has a {kind!r} part; only text is supported"
            )
        if not isinstance(part.get("text"), str):
            raise RequestTypeError(f"messages[{i}].content text parts need a string 'text'")
        texts.append(part["text"])
    return "".join(texts)


def _tool_call_dict(call: Any, i: int) -> dict[str, str]:
    """An OpenAI tool call (or a :class:`ToolCall`) as ``{id, name, arguments}``."""
    if isinstance(call, ToolCall):
        return {"id": call.id, "name": call.name, "arguments": call.arguments}
    if not isinstance(call, Mapping):
        raise RequestTypeError(f"messages[{i}].tool_calls entries must be objects")
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"messages[{i}].tool_calls needs a function name")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return {"id": str(call.get("id") or ""), "name": name, "arguments": args}


def check_json_schema(schema: Any, where: str) -> None:
    """Raise :class:`InvalidRequestError` unless ``schema`` is a valid JSON Schema whose local
    ``$ref``s all resolve."""
    if not isinstance(schema, Mapping):
        raise RequestTypeError(f"{where} must be a JSON Schema object")
    check_schema_depth(schema, where)
    from jsonschema import exceptions, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except exceptions.SchemaError as exc:
        path = "/".join(str(p) for p in exc.path)
        raise InvalidRequestError(
            f"{where} is not a valid JSON Schema: {exc.message}" + (f" (at {path})" if path else "")
        ) from None
    _check_refs(schema, schema, where)


def _check_refs(node: Any, root: Mapping[str, Any], where: str) -> None:
    if isinstance(node, Mapping):
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#"):
                raise InvalidRequestError(f"{where}: $ref {ref!r} is not local ('#/...')")
            target: Any = root
            for part in ref[1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, Mapping) and part in target:
                    target = target[part]
                else:
                    raise InvalidRequestError(f"{where}: $ref {ref!r} points at nothing")
        for value in node.values():
            _check_refs(value, root, where)
    elif isinstance(node, list):
        for value in node:
            _check_refs(value, root, where)


def tool_specs(tools: Sequence[Any] | None) -> list[ToolSpec]:
    """Function tools from OpenAI-style ``{"type": "function", "function": {...}}`` dicts,
    flat ``{name, description, parameters}`` dicts or objects with those attributes."""
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if isinstance(tool, Mapping):
            if tool.get("type", "function") != "function":
                raise InvalidRequestError(
                    f"tools[{i}] has type {tool.get('type')!r}; only 'function'"
                )
            fn = tool.get("function", tool)
            if not isinstance(fn, Mapping):
                raise RequestTypeError(f"tools[{i}].function must be an object")
            where = f"tools[{i}].function" if "function" in tool else f"tools[{i}]"
            check_schema_depth(fn.get("parameters"), f"{where}.parameters")
            check_strings(fn, where)
            name, desc, params = fn.get("name"), fn.get("description"), fn.get("parameters")
            strict = fn.get("strict", False)
        else:
            name = getattr(tool, "name", None)
            desc = getattr(tool, "description", None)
            params = getattr(tool, "parameters", None)
            strict = getattr(tool, "strict", False)
            check_schema_depth(params, f"tools[{i}].parameters")
            check_strings([name, desc, params], f"tools[{i}]")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise InvalidRequestError(f"tools[{i}] name {name!r} must match [A-Za-z0-9_-]{{1,64}}")
        if name in seen:
            raise InvalidRequestError(f"tools[{i}]: two tools are named {name!r}")
        seen.add(name)
        if params is not None:
            check_json_schema(params, f"tools[{i}].parameters")
        if desc is not None and not isinstance(desc, str):
            raise RequestTypeError(f"tools[{i}].description must be a string")
        if strict is None:
            strict = False
        if not isinstance(strict, bool):
            raise RequestTypeError(f"tools[{i}].strict must be true or false")
        out.append(ToolSpec(name, desc or "", dict(params) if params else None, strict))
    return out


def choice_name(tool_choice: ToolChoice, names: set[str]) -> str | None:
    """The forced function's name, '' for 'required', None for 'auto' / 'none'."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not names:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool")
        return ""
    if isinstance(tool_choice, Mapping):
        fn = tool_choice.get("function", tool_choice)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if name not in names:
            raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools")
        return name
    raise InvalidRequestError(
        "tool_choice must be 'auto', 'none', 'required' or {'function': {'name'}}"
    )
