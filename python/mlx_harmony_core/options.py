"""Per-request options: one typed schema for everything a request carries besides its
messages and :class:`~.params.SamplingParams`.

Each field's default and limits live here once; :meth:`Engine.request` takes these options
(as keyword arguments or a :class:`RequestOptions`), the CLI and the config read their
defaults from it (:data:`MAX_TOKENS`), and a misspelt option gets a "did you mean". The
``group`` of each field says where it goes: the chat format's rendering, the reply's
constraints (:mod:`.structured`), speculation (:mod:`.speculative`) or the request itself.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .errors import InvalidRequestError, RequestTypeError
from .params import FIELDS
from .speculative import DRAFTERS, MAX_DRAFT

MAX_TOKENS = 512  # the reply length limit when none is given (every front end)
MAX_TOOL_CALLS = 16  # built-in tool calls run per reply when none is given (every front end)

RENDER, GUIDE, SPECULATION, REQUEST = "render", "guide", "speculation", "request"
TOOLS = "tools"  # the built-in tools' loop (see tool_loop.py)


def _in(group: str, description: str) -> dict[str, Any]:
    return {"description": description, "json_schema_extra": {"group": group}}


class RequestOptions(BaseModel):
    """The options of one request (see :meth:`Engine.stream` for what each does)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # The request itself.
    max_tokens: StrictInt = Field(MAX_TOKENS, ge=1, **_in(REQUEST, "reply length limit"))
    truncate: StrictBool = Field(
        False, **_in(REQUEST, "drop the oldest turns when the prompt does not fit")
    )
    logprobs: StrictInt | None = Field(
        None, ge=0, **_in(REQUEST, "record each token's log-probability and the top n")
    )
    stop: str | Sequence[str] | None = Field(
        None, **_in(REQUEST, "strings that end the answer (not included)")
    )
    stop_tokens: Sequence[int | Sequence[int]] | None = Field(
        None, **_in(REQUEST, "token ids or id sequences that end the reply")
    )
    include_stop: StrictBool = Field(False, **_in(REQUEST, "keep the matched stop string"))
    ignore_eos: StrictBool = Field(False, **_in(REQUEST, "ignore the model's own end tokens"))
    raw: StrictBool = Field(False, **_in(REQUEST, "decode the reply as plain text"))
    should_stop: Callable[[], bool] | None = Field(
        None, **_in(REQUEST, "polled after each token: True cancels the reply")
    )
    logits_processors: Sequence[Callable[..., Any]] | None = Field(
        None, **_in(REQUEST, "mlx-lm-style fn(tokens, logits) -> logits")
    )
    token_mask: Callable[..., Any] | None = Field(
        None, **_in(REQUEST, "fn(reply tokens) -> packed mask of allowed tokens, or None")
    )

    # Rendering (the chat format's options).
    reasoning_effort: str | None = Field(None, **_in(RENDER, "low, medium or high"))
    model_identity: str | None = Field(None, **_in(RENDER, "the system message's identity"))
    knowledge_cutoff: str | None = Field(None, **_in(RENDER, "the system message's cutoff"))
    conversation_start_date: str | None = Field(None, **_in(RENDER, "today's date, for the model"))
    tools: Sequence[Any] | None = Field(None, **_in(RENDER, "function tools (OpenAI's shape)"))
    tool_choice: Any = Field(None, **_in(RENDER, "auto, none, required or a named tool"))

    # Built-in tools the engine runs itself (see tool_loop.py).
    builtin_tools: Sequence[str] | None = Field(
        None, **_in(TOOLS, "built-in tools to declare and run: python, browser")
    )
    max_tool_calls: StrictInt = Field(
        MAX_TOOL_CALLS, ge=0, le=1000, **_in(TOOLS, "built-in tool calls run per reply")
    )
    tool_session: str | None = Field(
        None, **_in(TOOLS, "the conversation key of the tools' state (python variables, pages)")
    )

    # Constraints on the reply (see structured.py).
    response_format: Any = Field(None, **_in(GUIDE, "OpenAI's response_format"))
    regex: str | None = Field(None, **_in(GUIDE, "the answer matches this regular expression"))
    grammar: str | None = Field(None, **_in(GUIDE, "a Lark grammar for the answer"))
    max_reasoning_tokens: StrictInt | None = Field(
        None, ge=0, **_in(GUIDE, "end the reasoning after this many tokens")
    )

    # Speculative decoding (see speculative.py).
    speculative: Literal[DRAFTERS] | None = Field(  # type: ignore[valid-type]
        None, **_in(SPECULATION, "ngram (prompt lookup) or draft (a draft model)")
    )
    draft_model: Any = Field(None, **_in(SPECULATION, "the draft model (speculative='draft')"))
    num_draft: StrictInt | None = Field(
        None, ge=1, le=MAX_DRAFT, **_in(SPECULATION, "tokens guessed per step at most (adapted)")
    )

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> RequestOptions:
        """Validate keyword arguments: unknown names get a "did you mean", bad values an
        :class:`InvalidRequestError` naming the field."""
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            names = [*cls.model_fields, *FIELDS]
            close = difflib.get_close_matches(unknown[0], names, 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if close and close[0] in FIELDS:
                hint += " (sampling settings go in params=SamplingParams(...))"
            raise RequestTypeError(f"unexpected keyword argument {unknown[0]!r}{hint}")
        try:
            return cls(**options)
        except ValidationError as exc:
            e = exc.errors()[0]
            name = str(e["loc"][0]) if e["loc"] else "options"
            kind = RequestTypeError if e["type"].endswith("_type") else InvalidRequestError
            raise kind(f"{name} {_reason(e)} (got {e.get('input')!r})", param=name) from None

    def group(self, group: str) -> dict[str, Any]:
        """The options of one group that were given (not left at ``None``)."""
        return {
            name: getattr(self, name)
            for name, field in type(self).model_fields.items()
            if (field.json_schema_extra or {}).get("group") == group  # type: ignore[union-attr]
            and getattr(self, name) is not None
        }


_BOUNDS = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">"}


def _reason(error: Any) -> str:
    """A validation error in the words the rest of the API uses ("must be >= 1")."""
    ctx = error.get("ctx") or {}
    op = _BOUNDS.get(error["type"])
    if op is not None and ctx:
        return f"must be {op} {next(iter(ctx.values()))}"
    return "must be " + str(error["msg"]).lower().removeprefix("input should be ")


def fields_in(group: str) -> frozenset[str]:
    """The names of one group's options."""
    return frozenset(
        name
        for name, field in RequestOptions.model_fields.items()
        if (field.json_schema_extra or {}).get("group") == group  # type: ignore[union-attr]
    )
