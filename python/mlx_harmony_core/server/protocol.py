"""The HTTP protocol: request models (strict, OpenAI's limits), error bodies and
:class:`APIError`, and the mapping of the engine's exceptions onto HTTP answers."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from ..errors import CapacityError, ContextLengthError, InvalidRequestError
from ..params import INT32_MAX, SamplingParams, constraints, problems, sampling_params
from ..structured import reasoning_budget_field

# Fields that clients send and that change nothing here: accepted and ignored.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``, OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """The answer (also an ASGI app, which the guards call directly)."""
        headers = dict(self.headers or {})
        if self.status >= 500 and self.status != 503:
            headers["Connection"] = "close"  # after a server error, start afresh
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def as_api_error(exc: Exception) -> APIError:
    """By type: the caller's mistakes are 400s, a full queue 503, anything else is ours
    (500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, CapacityError):
        return APIError(
            503,
            str(exc),
            type="server_error",
            code=exc.code,
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: ``{"error": {...}}``."""

    error: ErrorBody


# -- requests ------------------------------------------------------------------------------

# Where OpenAI's API defines a sampling field's limits differently from SamplingParams, its
# own limits apply here (mapped once); vLLM's top_k = -1 means "off".
OPENAI_LIMITS: dict[str, dict[str, Any]] = {
    "temperature": {"ge": 0.0, "le": 2.0, "allow_inf_nan": False},
    "top_k": {"ge": -1, "le": INT32_MAX},
}


def api_limits(name: str) -> dict[str, Any]:
    """The server's limits for sampling field ``name``."""
    return {**constraints(name), **OPENAI_LIMITS.get(name, {})}


# The most choices (``n``) one request may ask for: they decode as rows of one batch.
MAX_CHOICES = 16

Effort = Literal["minimal", "low", "medium", "high"]


class RequestFields(BaseModel):
    """Fields every generation endpoint shares; strict types, as OpenAI's API has."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # Whether the endpoint answers ``n`` > 1 (several choices); otherwise a 400.
    several_choices: ClassVar[bool] = False

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)

    def params(self) -> SamplingParams:
        """The sampling fields as :class:`SamplingParams` (a 400 for a bad combination)."""
        fields = {k: getattr(self, k) for k in SamplingParams.model_fields}
        if fields.get("top_k") == -1:  # vLLM's "off"
            fields["top_k"] = 0
        if self.logit_bias:  # type: ignore[attr-defined]
            try:
                fields["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}  # type: ignore[attr-defined]
            except ValueError:
                raise APIError(
                    400, "logit_bias keys must be token ids", param="logit_bias"
                ) from None
        try:
            return sampling_params(fields)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def stops(self) -> list[str] | None:
        """The stop strings, checked (up to 16, none empty)."""
        if self.stop is None:
            return None
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 16 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 16 non-empty strings", param="stop")
        return stops or None

    def checks(self, limit: int) -> None:
        """400 for ``n`` > 1 where the endpoint has one choice, and for a token limit over
        ``limit`` (``--max-tokens-limit``)."""
        if self.n != 1 and not self.several_choices:
            raise APIError(400, "n > 1 is not supported: send n requests", param="n")
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name, None)
            if value is not None and value > limit:
                raise APIError(
                    400,
                    f"{name} is {value}, over this server's limit of {limit} (--max-tokens-limit)",
                    param=name,
                )


def sampling_fields() -> dict[str, Any]:
    """Every :class:`SamplingParams` field as an optional request field, under OpenAI's
    limits where OpenAI defines them (``create_model`` field definitions)."""
    out: dict[str, Any] = {}
    for name, f in SamplingParams.model_fields.items():
        if name == "logit_bias":  # JSON object keys are strings
            out[name] = (dict[str, float] | None, Field(None, description=f.description))
        else:
            out[name] = (
                f.annotation | None,
                Field(None, description=f.description, **api_limits(name)),
            )
    return out


SamplingFields = create_model(  # type: ignore[call-overload]
    "SamplingFields", __base__=RequestFields, **sampling_fields()
)


class ChatReasoning(BaseModel):
    """A chat request's ``reasoning`` object (as the Responses API spells the effort)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    effort: Effort | None = None
    summary: str | None = None  # accepted; reasoning is returned whole


class ChatRequest(SamplingFields):  # type: ignore[misc,valid-type]
    """``POST /v1/chat/completions``."""

    several_choices: ClassVar[bool] = True

    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning_effort: Effort | None = None
    reasoning: ChatReasoning | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema: enforced token by token"
    )
    max_reasoning_tokens: int | None = reasoning_budget_field()  # an extension
    builtin_tools: list[str] | None = Field(
        None,
        description="an extension: built-in tools the engine runs in the reply (python, "
        "browser); the server must be started with them (serve --tools)",
    )

    def effort(self) -> str:
        """The reasoning effort: ``reasoning_effort`` or ``reasoning.effort`` (a 400 when
        both are given and differ); ``minimal`` is Harmony's ``low``; ``medium`` unset."""
        effort = self.reasoning_effort
        other = self.reasoning.effort if self.reasoning is not None else None
        if effort is not None and other is not None and effort != other:
            raise APIError(
                400,
                f"reasoning_effort {effort!r} and reasoning.effort {other!r} differ; send one",
                param="reasoning.effort",
            )
        effort = effort or other or "medium"
        return "low" if effort == "minimal" else effort


class CompletionRequest(SamplingFields):  # type: ignore[misc,valid-type]
    """``POST /v1/completions`` (a raw prompt, no chat template)."""

    several_choices: ClassVar[bool] = True

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    response_format: dict[str, Any] | None = Field(
        None, description="text, json_object or json_schema: enforced token by token"
    )
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or ``messages`` rendered by the
    model's chat format."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = True
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: Effort | None = None


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def parse_body(
    model: type[BaseModel], body: bytes, ignored: frozenset[str] = IGNORED_FIELDS
) -> Any:
    """``body`` (JSON bytes) validated as ``model``; an :class:`APIError` (400) naming the
    first problem otherwise. Fields in ``ignored`` are dropped first."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    for key in ignored & data.keys():
        data.pop(key)
    try:
        return model.model_validate(data)
    except RecursionError:
        raise APIError(400, "the body's JSON is nested too deeply") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"unrecognized request argument: {param}"
        elif err["loc"] and err["loc"][0] in SamplingParams.model_fields:
            msg = problems(exc, limits=api_limits)[0][1]
        else:
            msg = f"{param}: {err['msg']}" if param else err["msg"]
        raise APIError(400, msg, param=param) from None


class ResponsesRequest(SamplingFields):  # type: ignore[misc,valid-type]
    """``POST /v1/responses`` (OpenAI's Responses API). The items, tools and formats are
    checked field by field in :mod:`~.items` (errors name ``input[3].call_id``)."""

    input: str | list[Any] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    include: list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    reasoning: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    background: bool | None = None
    max_reasoning_tokens: int | None = reasoning_budget_field()  # an extension
