"""Structured outputs: JSON Schema, regular expressions and Lark grammars, enforced by
masking the logits at every step (llguidance computes the masks; the fused sampler never
draws a masked token), and the reasoning budget.

A constraint is a *part* (an llguidance grammar entry: ``{"json_schema": ...}`` or
``{"lark_grammar": ...}``). The chat format decides where parts apply in a reply
(:meth:`~.chat_format.ChatFormat.reply_grammar`): GPT-OSS keeps its reasoning free and
constrains the final answer and strict tool calls; other models constrain the whole reply.
A :class:`Guide` follows one reply token by token and gives the next step's mask.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from .errors import InvalidRequestError, RequestTypeError
from .messages import check_json_schema, check_schema_depth, tool_specs

logger = logging.getLogger(__name__)

# JSON is written compactly, with the separators models use ('{"a": 1, "b": 2}'): free
# whitespace lets a weak model write whitespace forever. A schema's own "x-guidance" wins.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
_CACHED_GRAMMARS = 64  # compiled grammars kept per chat format (a repeat skips compiling)

Part = dict[str, Any]


def reasoning_budget_field() -> Any:
    """The ``max_reasoning_tokens`` field of every config and request schema."""
    from pydantic import Field

    return Field(
        None, ge=0, description="end the reasoning after this many tokens (0: none; GPT-OSS)"
    )


class Budget(Protocol):
    """A chat format's reasoning budget: follows the reply, says which token must come next."""

    def push(self, token: int) -> None: ...

    def forced(self) -> int | None: ...


# -- constraints as grammar parts ---------------------------------------------------------------


def json_part(schema: Any, where: str) -> Part:
    """A JSON Schema as a grammar part (checked: a bad schema is an error naming ``where``)."""
    check_schema_depth(schema, where)  # before anything walks it
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        key = None  # not JSON: check_json_schema says why
    if key is None or key not in _checked:
        check_json_schema(schema, where)
        if key is not None:  # checking a big schema costs milliseconds: once is enough
            with _checked_lock:
                _checked[key] = None
                while len(_checked) > _CACHED_GRAMMARS:
                    _checked.popitem(last=False)
    schema = dict(schema)
    own = schema.get("x-guidance")
    schema["x-guidance"] = {**JSON_OPTIONS, **(own if isinstance(own, Mapping) else {})}
    return {"json_schema": schema}


_checked: OrderedDict[str, None] = OrderedDict()  # schemas already found valid
_checked_lock = threading.Lock()


def regex_part(regex: Any) -> Part:
    """A regular expression (Rust ``regex`` syntax) that the whole text must match."""
    if not isinstance(regex, str) or not regex:
        raise RequestTypeError("regex must be a non-empty string")
    import llguidance

    return {"lark_grammar": f"start: /{llguidance.regex_to_lark(regex)}/"}


def lark_part(grammar: Any) -> Part:
    """A Lark grammar (llguidance's dialect: ``start`` is the top rule; ``%json {...}``
    embeds a JSON Schema)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise RequestTypeError("grammar must be a non-empty Lark grammar string")
    return {"lark_grammar": grammar}


def response_format_part(value: Any) -> Part | None:
    """OpenAI's ``response_format`` as a grammar part (``None`` for plain text).

    ``{"type": "json_object"}`` is any JSON object; ``{"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}}`` is that schema (enforced whether or not
    ``strict`` is set: the mask costs the same).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestTypeError("response_format must be an object", param="response_format")
    kind = value.get("type", "text")
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequestError(
            f"response_format type {kind!r} is not one of {list(RESPONSE_FORMATS)}",
            param="response_format",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return json_part({"type": "object"}, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            "response_format json_schema needs a 'json_schema' object with the 'schema'",
            param="response_format.json_schema",
        )
    name = spec.get("name", "response")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            "response_format json_schema name must be a non-empty string",
            param="response_format.json_schema.name",
        )
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise InvalidRequestError(
            "response_format json_schema strict must be true or false",
            param="response_format.json_schema.strict",
        )
    schema = spec.get("schema", {"type": "object"})
    try:
        return json_part(schema, "response_format.json_schema.schema")
    except InvalidRequestError as exc:
        exc.param = "response_format.json_schema.schema"
        raise


def answer_part(response_format: Any = None, regex: Any = None, grammar: Any = None) -> Part | None:
    """The one constraint on the answer (at most one of the three may be given)."""
    given = [n for n, v in (("response_format", response_format), ("regex", regex)) if v]
    if grammar is not None:
        given.append("grammar")
    if len(given) > 1:
        raise InvalidRequestError(f"give one of {' / '.join(given)}, not several")
    if regex is not None:
        return regex_part(regex)
    if grammar is not None:
        return lark_part(grammar)
    return response_format_part(response_format)


def tool_parts(tools: Sequence[Any] | None) -> dict[str, Part | None]:
    """Each tool's arguments: its schema's part for strict tools, ``None`` (free) otherwise.
    A tool dict with a ``grammar`` (a Lark grammar: the Responses API's custom tools) takes
    free text under that grammar instead of JSON."""
    out: dict[str, Part | None] = {}
    for i, spec in enumerate(tool_specs(tools)):
        grammar = tools[i].get("grammar") if isinstance(tools[i], Mapping) else None  # type: ignore[index]
        if grammar is not None:
            out[spec.name] = lark_part(grammar)
            continue
        params = spec.parameters or {"type": "object", "properties": {}}
        out[spec.name] = json_part(params, f"tools[{i}].parameters") if spec.strict else None
    return out


# -- compiling ------------------------------------------------------------------------------


class Grammars:
    """One chat format's llguidance tokenizer (built on first use: ~1 s for 201k tokens)
    and its compiled grammars (a repeat of a grammar is a copy, not a compile)."""

    def __init__(self, chat_format: Any, vocab_size: int) -> None:
        self.format = chat_format
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled (``/metrics``)
        self.compile_seconds = 0.0

    @property
    def tokenizer(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _tokenizer(self.format, self.vocab_size)
            return self._tokenizer

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher for ``grammar`` (an llguidance grammar; errors name the problem)."""
        import llguidance

        tokenizer = self.tokenizer
        with self._lock:
            proto = self._compiled.get(grammar)
            if proto is not None:
                self._compiled.move_to_end(grammar)
                return proto.deep_copy()
        start = time.perf_counter()
        error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise InvalidRequestError(f"the constraint cannot be enforced: {error}")
        proto = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if proto.is_error():
            raise InvalidRequestError(f"the constraint cannot be enforced: {proto.get_error()}")
        with self._lock:
            self.compiles += 1
            self.compile_seconds += time.perf_counter() - start
            self._compiled[grammar] = proto
            while len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return proto.deep_copy()

    def __len__(self) -> int:
        return len(self._compiled)


def grammars_for(chat_format: Any, vocab_size: int) -> Grammars:
    """The :class:`Grammars` of ``chat_format`` (one per format object)."""
    cached = chat_format.__dict__.get("_grammars")
    if cached is None or cached.vocab_size != vocab_size:
        cached = chat_format.__dict__["_grammars"] = Grammars(chat_format, vocab_size)
    return cached


class _Vocabulary:
    """What llguidance reads of a tokenizer: every token's bytes, the special ones, the
    end tokens and an encoder."""

    is_tokenizer_wrapper = True

    def __init__(self, chat_format: Any, vocab_size: int) -> None:
        tokens = list(chat_format.token_bytes())[:vocab_size]
        tokens += [b""] * (vocab_size - len(tokens))  # the model's padding rows: never text
        self.tokens = tokens
        self.special_token_ids = sorted(i for i in chat_format.special_ids() if i < vocab_size)
        stops = chat_format.stop_ids()
        self.eos_token_id = stops[0] if stops else 0
        self.bos_token_id = None
        self._encode = chat_format.encode_text

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._encode(text))


def _tokenizer(chat_format: Any, vocab_size: int) -> Any:
    import llguidance

    vocab = _Vocabulary(chat_format, vocab_size)
    stops = chat_format.stop_ids()
    return llguidance.LLTokenizer(vocab, n_vocab=vocab_size, eos_token=stops or None)


# -- following a reply ----------------------------------------------------------------------


class Guide:
    """Constrains one reply: the grammar's matcher (``None``: no grammar) and the chat
    format's reasoning budget (``None``: none). :meth:`mask` is the next step's packed
    allowed-token mask (``None``: anything); :meth:`push` takes the token drawn."""

    def __init__(self, matcher: Any, budget: Budget | None, vocab_size: int) -> None:
        self.matcher = matcher
        self.budget = budget
        self.words = (vocab_size + 31) // 32

    def push(self, token: int) -> None:
        if self.budget is not None:
            self.budget.push(token)
        m = self.matcher
        if m is not None and not m.is_stopped() and not m.consume_token(token):
            raise ValueError(f"token {token} broke the output's grammar: {m.get_error()}")

    def mask(self) -> np.ndarray | None:
        forced = self.budget.forced() if self.budget is not None else None
        m = self.matcher
        if forced is not None and (m is None or m.validate_tokens([forced]) == 1):
            out = np.zeros(self.words, dtype=np.uint32)
            out[forced >> 5] = np.uint32(1 << (forced & 31))
            return out
        if m is None:
            return None
        if m.is_error():
            raise ValueError(f"the output's grammar failed: {m.get_error()}")
        out = np.empty(self.words, dtype=np.uint32)
        m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        return out

    @property
    def accepting(self) -> bool:
        """True when the text so far is complete under the grammar."""
        return self.matcher is None or self.matcher.is_accepting() or self.matcher.is_stopped()


def make_guide(
    chat_format: Any,
    vocab_size: int,
    *,
    response_format: Any = None,
    regex: Any = None,
    grammar: Any = None,
    tools: Sequence[Any] | None = None,
    tool_choice: Any = None,
    primer: Sequence[int] = (),
    max_reasoning_tokens: int | None = None,
    raw: bool = False,
) -> Guide | None:
    """The :class:`Guide` one request needs (``None`` when it asks for no constraint).

    ``raw``: the reply is plain text (a raw completion): the answer's constraint covers all
    of it, and there are no channels, tool calls or reasoning to budget.
    """
    if max_reasoning_tokens is not None and (
        isinstance(max_reasoning_tokens, bool)
        or not isinstance(max_reasoning_tokens, int)
        or max_reasoning_tokens < 0
    ):
        raise InvalidRequestError(
            f"max_reasoning_tokens must be an integer >= 0, got {max_reasoning_tokens!r}",
            param="max_reasoning_tokens",
        )
    answer = answer_part(response_format, regex, grammar)
    calls = tool_parts(tools) if tools and tool_choice != "none" and not raw else {}
    strict = any(p is not None for p in calls.values())
    budget = None
    if max_reasoning_tokens is not None and not raw:
        budget = chat_format.reasoning_budget(max_reasoning_tokens, primer)
        if budget is None:
            logger.debug("max_reasoning_tokens: this chat format has no reasoning channel")
    if answer is None and not strict:
        return Guide(None, budget, vocab_size) if budget is not None else None
    text = grammar_json([answer]) if raw and answer else chat_format.reply_grammar(answer, calls)
    if text is None:
        return Guide(None, budget, vocab_size) if budget is not None else None
    try:
        matcher = grammars_for(chat_format, vocab_size).matcher(text)
    except InvalidRequestError as exc:
        if answer is None:
            exc.param = "tools"
        else:
            exc.param = (
                "regex" if regex else "grammar" if grammar is not None else "response_format"
            )
        raise
    for token in primer:  # a forced tool call's header is already in the prompt
        if not matcher.consume_token(token):
            raise InvalidRequestError(
                f"the forced tool call does not fit the constraint: {matcher.get_error()}"
            )
    return Guide(matcher, budget, vocab_size)


def grammar_json(parts: Sequence[Part]) -> str:
    """llguidance's top-level grammar: the first part is the start; the others are named
    and referenced from it as ``@name``."""
    return json.dumps({"grammars": list(parts)}, separators=(",", ":"))
