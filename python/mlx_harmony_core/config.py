"""Validated configuration objects (Pydantic)."""

from __future__ import annotations

import datetime
import difflib
import getpass
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from ._paths import home
from .options import MAX_TOKENS
from .params import SamplingParams, problems
from .structured import reasoning_budget_field

_M = TypeVar("_M", bound=BaseModel)


# -- prompt configs, profiles and the settings they resolve to ------------------------------

Effort = Literal["low", "medium", "high"]


class Example(BaseModel):
    """A few-shot example: a user message and the assistant's answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str
    assistant: str


class _PromptFields(BaseModel):
    """The fields of :class:`PromptConfig` that are not sampling fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Harmony system message
    model_identity: str | None = None
    reasoning_effort: Effort | None = None
    knowledge_cutoff: str | None = None
    conversation_start_date: str | None = None
    # Developer instructions (OpenAI "system" text goes here too) and few-shot examples
    instructions: str | None = None
    examples: tuple[Example, ...] | None = None
    user_name: str | None = Field(None, description="value of the {user} placeholder")
    # Generation
    max_tokens: int | None = Field(None, ge=1)
    max_reasoning_tokens: int | None = reasoning_budget_field()
    context_length: int | None = Field(None, ge=16, description="override the model's window")
    truncate: bool | None = Field(None, description="drop the oldest turns instead of failing")
    show_reasoning: bool | None = None

    @model_validator(mode="after")
    def _check_sampling(self) -> Any:
        try:  # out-of-range sampling values fail here, where the file is named
            self.sampling()
        except ValidationError as exc:
            raise ValueError("; ".join(m for _, m in problems(exc))) from None
        return self

    def sampling(self) -> SamplingParams:
        """The sampling fields that are set, as :class:`SamplingParams` (defaults elsewhere)."""
        fields = {k: getattr(self, k) for k in SamplingParams.model_fields}
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})

    def layered(self, *over: Any) -> Any:
        """This config with the fields set in each of ``over`` (later wins)."""
        data = self.model_dump(exclude_none=True)
        for layer in over:
            if not isinstance(layer, PromptConfig):
                layer = PromptConfig.model_validate(layer)
            data.update(layer.model_dump(exclude_none=True))
        return PromptConfig.model_validate(data)

    def render_options(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        """Keyword arguments for :meth:`Engine.stream` (placeholders filled)."""
        values = placeholder_values(self.user_name, now)
        out: dict[str, Any] = {"reasoning_effort": self.reasoning_effort or "medium"}
        for key in ("model_identity", "knowledge_cutoff", "conversation_start_date"):
            value = getattr(self, key)
            if value:
                out[key] = fill_placeholders(value, values)
        return out

    def prefix_messages(self, now: datetime.datetime | None = None) -> list[dict[str, str]]:
        """Developer instructions and few-shot examples, to put before the conversation."""
        values = placeholder_values(self.user_name, now)
        out = []
        if self.instructions:
            out.append(
                {"role": "developer", "content": fill_placeholders(self.instructions, values)}
            )
        for ex in self.examples or ():
            out.append({"role": "user", "content": fill_placeholders(ex.user, values)})
            out.append({"role": "assistant", "content": fill_placeholders(ex.assistant, values)})
        return out


# Every SamplingParams field, flat and optional (``temperature = 0.7``); its limits are
# checked by SamplingParams itself, so they are stated once.
PromptConfig = create_model(  # type: ignore[call-overload]
    "PromptConfig",
    __base__=_PromptFields,
    __doc__="""What a conversation starts from; every field optional so configs can be layered.

    Text fields may use placeholders (see :func:`fill_placeholders`). Sampling fields are
    those of :class:`SamplingParams`, flat (``temperature = 0.7``).
    """,
    **{
        name: (f.annotation | None, Field(None, description=f.description))
        for name, f in SamplingParams.model_fields.items()
    },
)
PromptConfig.__module__ = __name__


def placeholder_values(
    user_name: str | None = None, now: datetime.datetime | None = None
) -> dict[str, str]:
    """Values of the placeholders: ``{user}``, ``{date}``, ``{time}``, ``<|DATE|>``,
    ``<|DATETIME|>`` (local time)."""
    now = now or datetime.datetime.now().astimezone()
    if user_name is None:
        try:
            user_name = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (containers)
            user_name = "user"
    date = now.strftime("%Y-%m-%d")
    return {
        "{user}": user_name,
        "{date}": date,
        "{time}": now.strftime("%H:%M"),
        "<|DATE|>": date,
        "<|DATETIME|>": now.isoformat(timespec="minutes"),
    }


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace the known placeholders only: other braces (JSON, code) are left alone."""
    if not values:
        return text
    pattern = re.compile("|".join(re.escape(k) for k in values))
    return pattern.sub(lambda m: values[m.group(0)], text)


DEFAULTS = PromptConfig(reasoning_effort="medium", max_tokens=MAX_TOKENS, truncate=False)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON or TOML file as a dict; ``ValueError`` naming the file when it is unreadable."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        if path.suffix == ".toml":
            with path.open("rb") as f:
                data = tomllib.load(f)
        else:
            data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid {path.suffix[1:].upper() or 'JSON'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold an object of settings")
    return data


def _validated(cls: type[_M], data: Any, source: str) -> _M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{source}: {_problems(exc)}") from None


def _problems(exc: ValidationError) -> str:
    out = []
    for (name, msg), e in zip(problems(exc), exc.errors(), strict=True):
        if e["type"] == "extra_forbidden" and name and len(e["loc"]) == 1:
            close = difflib.get_close_matches(name, PromptConfig.model_fields, 1)
            msg += f" (did you mean {close[0]!r}?)" if close else ""
        out.append(msg)
    return "; ".join(out)


def load_prompt_config(path: str | os.PathLike[str]) -> PromptConfig:
    """Read a prompt config (JSON or TOML). Unknown fields are an error, never dropped."""
    return _validated(PromptConfig, read_config_file(path), str(path))


class Profile(BaseModel):
    """A named pairing of a model and a prompt config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    prompt_config: PromptConfig | str | None = Field(
        None, description="inline, or a path relative to the profiles file"
    )


class Profiles(BaseModel):
    """The profiles file: ``{"profiles": {name: {"model": ..., "prompt_config": ...}}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profiles: dict[str, Profile]


def default_profiles_path() -> Path:
    """``$MLX_HARMONY_CORE_PROFILES``, else ``profiles.toml`` / ``.json`` in the home dir."""
    env = os.environ.get("MLX_HARMONY_CORE_PROFILES")
    if env:
        return Path(env).expanduser()
    base = home()
    toml = base / "profiles.toml"
    return toml if toml.exists() else base / "profiles.json"


def load_profile(name: str, path: str | os.PathLike[str] | None = None) -> tuple[str, PromptConfig]:
    """The model and prompt config of profile ``name``."""
    path = Path(path).expanduser() if path is not None else default_profiles_path()
    if not path.is_file():
        base = home()
        raise ValueError(
            f"no profiles file for --profile {name!r}: {path} does not exist. Write one "
            f"({base / 'profiles.toml'} or {base / 'profiles.json'}, or "
            "$MLX_HARMONY_CORE_PROFILES) or pass --profiles FILE"
        )
    profiles = _validated(Profiles, read_config_file(path), str(path)).profiles
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ValueError(f"no profile {name!r} in {path} (profiles: {known})")
    profile = profiles[name]
    config = profile.prompt_config
    if isinstance(config, str):
        config = load_prompt_config(path.parent / Path(config).expanduser())
    return profile.model, config or PromptConfig()


def resolve_settings(
    *,
    prompt_config: PromptConfig | None = None,
    chat: Mapping[str, Any] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> PromptConfig:
    """Precedence: CLI > chat file > prompt config > defaults (fields left unset fall through)."""
    layers: list[PromptConfig] = [prompt_config or PromptConfig()]
    if chat:
        layers.append(_validated(PromptConfig, dict(chat), "chat settings"))
    if cli:
        layers.append(
            _validated(
                PromptConfig, {k: v for k, v in cli.items() if v is not None}, "command line"
            )
        )
    return DEFAULTS.layered(*layers)
