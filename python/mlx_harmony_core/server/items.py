"""Responses API items <-> the engine's chat messages (and so Harmony).

Input items (OpenAI's shapes) are checked, given ids and turned into the OpenAI-style chat
messages that :mod:`~mlx_harmony_core.harmony` renders:

- ``message`` (user / system / developer / assistant; string or typed text parts) -> a
  message of that role;
- ``reasoning`` (``content`` of ``reasoning_text``, or an ``encrypted_content`` blob this
  server issued) -> the ``reasoning`` of the next assistant message (Harmony's analysis
  channel; the renderer keeps it between tool calls and drops it after a final answer);
- ``function_call`` -> a ``tool_calls`` entry of an assistant message (commentary
  ``to=functions.X``);
- ``function_call_output`` -> a ``tool`` message (``functions.X to=assistant``), which must
  answer an earlier ``function_call`` of the conversation.

Every problem is an :class:`~.protocol.APIError` (400) naming the parameter
(``input[3].call_id``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError
from ..messages import tool_specs
from .protocol import APIError

PREFIXES = {
    "message": "msg_",
    "reasoning": "rs_",
    "function_call": "fc_",
    "function_call_output": "fco_",
    "custom_tool_call": "ctc_",
    "custom_tool_call_output": "ctco_",
}
CALLS = ("function_call", "custom_tool_call")
OUTPUTS = ("function_call_output", "custom_tool_call_output")
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
MAX_ITEMS = 4096  # input items in one request
# Built-in tools: the Responses tool types and the engine's tool each stands for.
BUILTIN_TOOLS = {
    "code_interpreter": "python",
    "web_search": "browser",
    "web_search_2025_08_26": "browser",
    "web_search_preview": "browser",
    "web_search_preview_2025_03_11": "browser",
}
# Their output items: kept in a conversation, never sent back to the model (they are
# part of a turn's reasoning, which Harmony drops once the turn has its final answer).
BUILTIN_CALLS = ("code_interpreter_call", "web_search_call")


def new_id(kind: str) -> str:
    """A fresh item id (``msg_...``, ``rs_...``, ``fc_...``)."""
    return PREFIXES.get(kind, "item_") + uuid.uuid4().hex


def bad(message: str, param: str) -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param=param)


# -- opaque reasoning (store: false) ------------------------------------------------------------


class ReasoningSealer:
    """Reasoning text sealed for stateless clients: encrypted (HMAC-SHA256 in counter
    mode, a random nonce per blob) and authenticated (HMAC-SHA256, encrypt-then-MAC) with
    a per-server key, so a client can hand it back but neither read nor forge it."""

    VERSION = b"mhc1"

    def __init__(self, key: bytes) -> None:
        self.enc_key = hmac.new(key, b"encrypt", hashlib.sha256).digest()
        self.mac_key = hmac.new(key, b"authenticate", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: Path) -> ReasoningSealer:
        """The key kept in ``path`` (created, mode 0600, on first use)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) < 32:
                raise ValueError(
                    f"{path} is not a reasoning key (too short); remove it to make a new one"
                ) from None
            return cls(key)
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return cls(key)

    def _stream(self, nonce: bytes, n: int) -> bytes:
        out = bytearray()
        counter = 0
        while len(out) < n:
            block = nonce + counter.to_bytes(8, "big")
            out += hmac.new(self.enc_key, block, hashlib.sha256).digest()
            counter += 1
        return bytes(out[:n])

    def seal(self, text: str) -> str:
        """``text`` as an opaque blob."""
        plain = json.dumps({"text": text}, ensure_ascii=False).encode()
        nonce = secrets.token_bytes(16)
        cipher = bytes(a ^ b for a, b in zip(plain, self._stream(nonce, len(plain)), strict=True))
        body = self.VERSION + nonce + cipher
        tag = hmac.new(self.mac_key, body, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(body + tag).decode()

    def open(self, blob: str, param: str) -> str:
        """The text sealed in ``blob``; a 400 naming ``param`` if it is not one of ours."""
        try:
            raw = base64.urlsafe_b64decode(blob.encode())
        except (ValueError, UnicodeEncodeError):
            raw = b""
        body, tag = raw[:-32], raw[-32:]
        good = len(raw) > 4 + 16 + 32 and body.startswith(self.VERSION)
        expect = hmac.new(self.mac_key, body, hashlib.sha256).digest()
        if not good or not hmac.compare_digest(tag, expect):
            raise bad("encrypted_content was not issued by this server or was altered", param)
        nonce, cipher = body[4:20], body[20:]
        plain = bytes(a ^ b for a, b in zip(cipher, self._stream(nonce, len(cipher)), strict=True))
        return str(json.loads(plain)["text"])


# -- input items --------------------------------------------------------------------------------


def _text(content: Any, param: str) -> str:
    """A message's content: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(f"{param} must be a string or a list of content parts", param)
    texts = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, Mapping):
            raise bad(f"{where} must be an object", where)
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise bad(
                f"{where} has type {kind!r}; only text parts ({', '.join(TEXT_PARTS[:2])}) "
                "are supported",
                f"{where}.type",
            )
        key = "refusal" if kind == "refusal" else "text"
        if not isinstance(part.get(key), str):
            raise bad(f"{where}.{key} must be a string", f"{where}.{key}")
        texts.append(part[key])
    return "".join(texts)


def _string(item: Mapping[str, Any], key: str, param: str, *, empty: bool = False) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (not value and not empty):
        raise bad(f"{param}.{key} must be a non-empty string", f"{param}.{key}")
    return value


def normalize_input(
    value: str | list[Any], sealer: ReasoningSealer | None, base: str = "input"
) -> list[dict[str, Any]]:
    """The request's ``input`` as checked items in their stored shape (each with an id).

    Reasoning sealed in ``encrypted_content`` is opened (and the blob dropped: the stored
    item carries the text)."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if len(value) > MAX_ITEMS:
        raise bad(f"input has {len(value)} items; at most {MAX_ITEMS}", base)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"{base}[{i}]"
        if not isinstance(item, Mapping):
            raise bad(f"{param} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        item_id = item.get("id")
        if item_id is not None and not isinstance(item_id, str):
            raise bad(f"{param}.id must be a string", f"{param}.id")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad(
                    f"{param}.role is {role!r}; expected one of {', '.join(ROLES)}",
                    f"{param}.role",
                )
            text = _text(item.get("content"), f"{param}.content")
            part = "output_text" if role == "assistant" else "input_text"
            content: dict[str, Any] = {"type": part, "text": text}
            if part == "output_text":
                content.update(annotations=[], logprobs=[])
            out.append(
                {
                    "id": item_id or new_id("message"),
                    "type": "message",
                    "role": role,
                    "content": [content],
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            text = ""
            blob = item.get("encrypted_content")
            if blob is not None:
                if not isinstance(blob, str):
                    raise bad(f"{param}.encrypted_content must be a string", param)
                if sealer is None:
                    raise bad("this server issues no encrypted_content", param)
                text = sealer.open(blob, f"{param}.encrypted_content")
            else:
                parts = item.get("content") or []
                if not isinstance(parts, list):
                    raise bad(f"{param}.content must be a list", f"{param}.content")
                for j, p in enumerate(parts):
                    if not isinstance(p, Mapping) or p.get("type") != "reasoning_text":
                        raise bad(
                            f"{param}.content[{j}] must be a reasoning_text part",
                            f"{param}.content[{j}]",
                        )
                    text += _string(p, "text", f"{param}.content[{j}]", empty=True)
            summary = item.get("summary", [])
            if not isinstance(summary, list):
                raise bad(f"{param}.summary must be a list", f"{param}.summary")
            out.append(
                {
                    "id": item_id or new_id("reasoning"),
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}],
                }
            )
        elif kind in CALLS:
            key = "arguments" if kind == "function_call" else "input"
            args = item.get(key, "")
            if not isinstance(args, str):
                raise bad(f"{param}.{key} must be a string", f"{param}.{key}")
            call = {
                "id": item_id or new_id(kind),
                "type": kind,
                "call_id": _string(item, "call_id", param),
                "name": _string(item, "name", param),
                key: args,
            }
            if kind == "function_call":
                call["status"] = "completed"
            out.append(call)
        elif kind in BUILTIN_CALLS:
            out.append({**item, "id": item_id or new_id(kind), "type": kind})
        elif kind in OUTPUTS:
            output = item.get("output")
            if not isinstance(output, str):
                output = _text(output, f"{param}.output")
            done = {
                "id": item_id or new_id(kind),
                "type": kind,
                "call_id": _string(item, "call_id", param),
                "output": output,
            }
            if kind == "function_call_output":
                done["status"] = "completed"
            out.append(done)
        else:
            raise bad(
                f"{param} has type {kind!r}; supported: message, reasoning, function_call, "
                "function_call_output, custom_tool_call, custom_tool_call_output, "
                "code_interpreter_call, web_search_call",
                f"{param}.type",
            )
    return out


def check_calls(history: Sequence[Mapping[str, Any]], items: Sequence[Mapping[str, Any]]) -> None:
    """Every ``function_call_output`` of ``items`` answers a ``function_call`` before it
    (in ``history`` or earlier in ``items``); a 400 naming the item's ``call_id``
    otherwise."""
    calls = {it["call_id"]: it["type"] for it in history if it["type"] in CALLS}
    for i, item in enumerate(items):
        kind = item["type"]
        if kind in CALLS:
            calls[item["call_id"]] = kind
        elif kind in OUTPUTS and calls.get(item["call_id"]) != CALLS[OUTPUTS.index(kind)]:
            call = CALLS[OUTPUTS.index(kind)]
            raise bad(
                f"{kind} call_id {item['call_id']!r} matches no {call} before it",
                f"input[{i}].call_id",
            )


def to_messages(items: Sequence[Mapping[str, Any]], instructions: str | None) -> list[dict]:
    """Chat messages (the engine's input) for a conversation of items."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "developer", "content": instructions})
    names: dict[str, str] = {}
    pending: list[str] = []  # reasoning waiting for its assistant message
    current: dict[str, Any] | None = None  # the assistant message being built

    def assistant() -> dict[str, Any]:
        nonlocal current, pending
        if current is None:
            current = {"role": "assistant", "content": None, "tool_calls": []}
            messages.append(current)
        if pending:
            current["reasoning"] = (current.get("reasoning") or "") + "".join(pending)
            pending = []
        return current

    for item in items:
        kind = item["type"]
        if kind in BUILTIN_CALLS:
            continue  # a built-in call: the model's own reasoning (see BUILTIN_CALLS)
        if kind == "reasoning":
            if current is not None and (current["content"] or current["tool_calls"]):
                current = None  # reasoning starts the next assistant message
            pending.append(item["content"][0]["text"] if item["content"] else "")
        elif kind == "message" and item["role"] == "assistant":
            msg = assistant()
            text = item["content"][0]["text"]
            msg["content"] = (msg["content"] or "") + text
            current = None
        elif kind in CALLS:
            names[item["call_id"]] = item["name"]
            args = item["arguments"] if kind == "function_call" else item["input"]
            assistant()["tool_calls"].append(
                {"id": item["call_id"], "name": item["name"], "arguments": args}
            )
        else:
            if pending:  # reasoning with nothing after it in its turn
                assistant()
            current = None
            if kind in OUTPUTS:
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": item["call_id"],
                        "name": names.get(item["call_id"], ""),
                        "content": item["output"],
                    }
                )
            else:
                messages.append({"role": item["role"], "content": item["content"][0]["text"]})
    if pending:
        assistant()
    for m in messages:
        if m["role"] == "assistant":
            if not m["tool_calls"]:
                del m["tool_calls"]
            if m["content"] is None and "tool_calls" not in m:
                m["content"] = ""
    return messages


# -- tools --------------------------------------------------------------------------------------


FIELDS = {
    "function": {"type", "name", "description", "parameters", "strict"},
    "custom": {"type", "name", "description", "format"},
}


def _custom_grammar(fmt: Any, param: str) -> tuple[str | None, str]:
    """A custom tool's ``format``: its Lark grammar (None: free text) and what the model
    is told about its input."""
    if fmt is None or (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        return None, "Its input is free text (not JSON)."
    if not isinstance(fmt, Mapping) or fmt.get("type") != "grammar":
        raise bad(f"{param}.format must be {{type: text}} or {{type: grammar}}", f"{param}.format")
    syntax, definition = fmt.get("syntax"), fmt.get("definition")
    if not isinstance(definition, str) or not definition.strip():
        raise bad(f"{param}.format.definition must be a grammar", f"{param}.format.definition")
    if syntax == "lark":
        grammar = definition
    elif syntax == "regex":
        import llguidance

        try:
            grammar = f"start: /{llguidance.regex_to_lark(definition)}/"
        except Exception as exc:  # llguidance's own error type
            raise bad(f"{param}.format.definition: {exc}", f"{param}.format.definition") from None
    else:
        raise bad(f"{param}.format.syntax must be lark or regex", f"{param}.format.syntax")
    return grammar, f"Its input is text matching this {syntax} grammar:\n{definition}"


def engine_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """Responses tools as the engine's tool dicts, checked; a 400 naming ``tools[i]``.

    Function tools (flat ``{type, name, description, parameters, strict}``) pass as they
    are; ``custom`` tools (free-text input, or text under a Lark / regex ``format``
    grammar) become function tools whose call body is that text, constrained by the
    grammar (``grammar``, which the guide enforces) and described to the model."""
    out = []
    for i, tool in enumerate(tools or []):
        param = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise bad(f"{param} must be an object", param)
        kind = tool.get("type")
        if kind in BUILTIN_TOOLS:
            continue  # see builtin_tools
        if kind not in FIELDS:
            raise bad(
                f"{param} has type {kind!r}; this server runs function, custom, "
                "code_interpreter and web_search tools",
                f"{param}.type",
            )
        unknown = set(tool) - FIELDS[kind]
        if unknown:
            raise bad(f"{param} has unknown field {sorted(unknown)[0]!r}", param)
        spec: dict[str, Any] = {
            "type": "function",
            "name": tool.get("name"),
            "description": tool.get("description"),
            "parameters": tool.get("parameters"),
            "strict": bool(tool.get("strict") or False),
        }
        if kind == "custom":
            grammar, note = _custom_grammar(tool.get("format"), param)
            desc = tool.get("description")
            if desc is not None and not isinstance(desc, str):
                raise bad(f"{param}.description must be a string", f"{param}.description")
            spec.update(description=f"{desc}\n\n{note}" if desc else note, custom=True)
            if grammar is not None:
                spec["grammar"] = grammar
        try:
            tool_specs([spec])
        except InvalidRequestError as exc:
            raise bad(str(exc).replace("tools[0]", param), param) from None
        out.append(spec)
    names = [t["name"] for t in out]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad(f"tools[{i}]: two tools are named {name!r}", f"tools[{i}].name")
    return out


def builtin_tools(tools: list[Any] | None, enabled: Sequence[str]) -> list[str]:
    """The engine's built-in tools the request declares (``code_interpreter`` is
    ``python``, ``web_search`` / ``web_search_preview`` are ``browser``); a 400 naming
    ``tools[i]`` for one the server was not started with (``serve --tools``)."""
    names: list[str] = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, Mapping) or tool.get("type") not in BUILTIN_TOOLS:
            continue
        name = BUILTIN_TOOLS[tool["type"]]
        if name not in enabled:
            on = ", ".join(enabled) or "none"
            raise bad(
                f"tools[{i}] ({tool['type']}) needs the built-in {name} tool, which this server "
                f"does not run (enabled: {on}; start it with serve --tools {name})",
                f"tools[{i}].type",
            )
        if name not in names:
            names.append(name)
    return names


def echo_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """The tools as a response shows them (OpenAI's shapes, defaults filled in)."""
    out = []
    for tool in tools or []:
        if tool["type"] == "code_interpreter":
            out.append({"container": {"type": "auto"}, **tool})
        elif tool["type"] in BUILTIN_TOOLS:
            out.append(dict(tool))
        elif tool["type"] == "custom":
            out.append({"format": {"type": "text"}, **tool})
        else:
            out.append({"description": None, "parameters": None, "strict": False, **tool})
    return out


def engine_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> Any:
    """``tool_choice`` as the engine takes it (auto / none / required / a function)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, Mapping) and choice.get("type") in ("function", "custom"):
        name = choice.get("name")
        if name not in {t["name"] for t in tools}:
            raise bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return {"type": "function", "function": {"name": name}}
    raise bad(
        "tool_choice must be auto, none, required or {type: function | custom, name}",
        "tool_choice",
    )


def response_format(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as chat completions' ``response_format``."""
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise bad("text.format must be an object", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), Mapping):
            raise bad("text.format.schema must be a JSON Schema object", "text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise bad(
        f"text.format.type is {kind!r}; expected text, json_object or json_schema",
        "text.format.type",
    )
