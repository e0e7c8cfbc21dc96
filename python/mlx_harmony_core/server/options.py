"""What ``serve`` is started with: :class:`ServerOptions`, the one source of the serve
defaults and limits.

Each field that ``mlx-harmony-core serve`` takes as a flag carries a :class:`Flag` in its
metadata (flag name, help, bounds, unit); the CLI builds the ``serve`` flags from these, so
no default or limit is written twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..options import MAX_TOOL_CALLS
from ..prompt_store import DEFAULT_MAX_BYTES as PROMPT_CACHE_BYTES
from ..prompt_store import MIN_MAX_BYTES as PROMPT_CACHE_MIN_BYTES
from ..scheduler import MAX_BATCH, PREFILL_CHUNK

MIB = 2**20


@dataclass(frozen=True)
class Flag:
    """How a :class:`ServerOptions` field is given on the command line.

    ``help`` may use ``%(default)s`` (the flag's default). ``ge`` / ``gt`` bound the value
    as typed; ``parse`` names a parser of the CLI's own (``"port"``); ``scale`` converts
    the flag's unit to the field's (``--max-body-mb`` to bytes: ``MIB``); ``negate`` makes
    a boolean field a ``--no-...`` switch; ``unset`` gives the flag a default of None where
    the field's default is worked out from other flags.
    """

    help: str
    name: str | None = None
    ge: float | None = None
    gt: float | None = None
    parse: str | None = None
    scale: int = 1
    negate: bool = False
    unset: bool = False

    def flag(self, field_name: str) -> str:
        """The flag's spelling: ``name``, or ``--field-name``."""
        return self.name or "--" + field_name.replace("_", "-")

    def dest(self, field_name: str) -> str:
        """Where argparse puts the flag's value: ``--max-body-mb`` -> ``max_body_mb``."""
        return self.flag(field_name)[2:].replace("-", "_")

    def default(self, value: Any) -> Any:
        """The flag's default for a field whose default is ``value``."""
        if self.unset or value is None:
            return None
        if self.negate:
            return False
        if isinstance(value, tuple):
            return None
        return value / self.scale if self.scale != 1 else value

    def value(self, given: Any, default: Any) -> Any:
        """The field's value for what the flag parsed to (``default``: the field's)."""
        if self.negate:
            return not given
        if isinstance(default, tuple):
            return tuple(given or ())
        if given is not None and self.scale != 1:
            return int(given * self.scale)
        return given


def option(default: Any, help: str, **flag: Any) -> Any:
    """A :class:`ServerOptions` field that is also a ``serve`` flag."""
    return field(default=default, metadata={"flag": Flag(help, **flag)})


@dataclass
class ServerOptions:
    """What ``serve`` was started with: the server's defaults and limits.

    Fields with a :class:`Flag` are the ``serve`` subcommand's flags. ``port`` and the
    prefix-cache fields are used by :func:`~.app.serve` and the CLI (binding, loading the
    engine); :func:`~.app.create_app` reads the rest.
    """

    # The first fields in their order of old (positional use); new ones go at the end.
    model_name: str = option("demo", "the id clients use (default: dir name)", unset=True)
    api_key: str | None = option(None, "require 'Bearer KEY' (or MLX_HARMONY_CORE_API_KEY)")
    max_queue: int = option(64, "requests waiting before 503", ge=0)
    max_batch: int = option(
        MAX_BATCH,
        "requests decoded together in one batch (1: one at a time; %(default)s)",
        ge=1,
    )
    kv_budget_bytes: int | None = option(
        None,
        "KV cache memory for all running requests (default: half the free memory)",
        name="--kv-budget-mb",
        gt=0,
        scale=MIB,
    )
    prefill_chunk: int = option(
        PREFILL_CHUNK,
        "prompt tokens a joining request runs between two decode steps (%(default)s)",
        ge=1,
    )
    max_body_bytes: int = option(4 * MIB, "request body limit", name="--max-body-mb", scale=MIB)
    body_timeout_s: float = option(30.0, "seconds to receive a request body", name="--body-timeout")
    default_max_tokens: int = option(
        4096, "reply limit when a request sets none", name="--max-tokens", ge=1
    )
    max_tokens_limit: int = option(
        32768, "largest max_tokens a request may ask for (400 beyond)", ge=1
    )
    max_reasoning_tokens: int | None = option(
        None, "end reasoning after N tokens when a request sets no max_reasoning_tokens", ge=0
    )
    # Speculative decoding for every request (see speculative.py): "ngram" or "draft"; the
    # flags are those of generate and chat.
    speculative: str | None = None
    draft_model: Any = None  # an Engine, for "draft"
    num_draft: int | None = None
    host: str = option("127.0.0.1", "address to bind (default: loopback)")
    allowed_hosts: tuple[str, ...] = option((), "extra Host names to answer to")
    cors_origins: tuple[str, ...] = option((), "web origins allowed to call (CORS)")
    version: str = ""
    web: bool = option(True, "no chat page at / (the API only)", name="--no-web", negate=True)
    port: int = option(8000, "TCP port (0 = any free one)", parse="port")
    prefix_cache_entries: int = option(64, "KV caches kept for prefix reuse")
    prefix_cache_bytes: int = option(
        2048 * MIB, "prefix cache bound", name="--prefix-cache-mb", scale=MIB
    )
    # KV caches of long prompt prefixes on disk, kept across restarts (prompt_store.py).
    prompt_cache_dir: str | None = option(
        None, "keep KV caches of long prompt prefixes in DIR, across restarts (default: off)"
    )
    prompt_cache_bytes: int = option(
        PROMPT_CACHE_BYTES,
        f"bound of --prompt-cache-dir, least recently used evicted first (>= "
        f"{PROMPT_CACHE_MIN_BYTES // MIB}; %(default)s)",
        name="--prompt-cache-mb",
        gt=0,
        scale=MIB,
    )
    # The Responses API's stored responses (server/store.py).
    store: bool = option(
        True,
        "keep no responses (/v1/responses store: false for all)",
        name="--no-store",
        negate=True,
    )
    responses_db: str | None = option(
        None, "SQLite file of stored responses (default: $MLX_HARMONY_CORE_HOME/responses.db)"
    )
    metrics: bool = option(
        True, "no /metrics endpoint (Prometheus counters)", name="--no-metrics", negate=True
    )
    log_format: Literal["text", "json"] = option(
        "text",
        "log lines as plain text, or one JSON object each (a request's: id, model, endpoint, "
        "status, tokens, TTFT, duration, finish reason, client)",
    )
    # Several models in one server (server/pool.py): -m NAME=PATH repeated, or a models file.
    models_file: str | None = option(
        None, "JSON or TOML file of the models to serve (names, paths, adapters, options)"
    )
    model_ttl_s: float | None = option(
        None, "several models: unload one idle this many seconds", name="--model-ttl", gt=0
    )
    memory_budget_bytes: int | None = option(
        None,
        "several models: memory for their weights (default: 3/4 of the available memory)",
        name="--memory-budget-mb",
        gt=0,
        scale=MIB,
    )
    lazy_load: bool = option(
        True, "several models: load all at startup (default: each on first use)",
        name="--preload", negate=True,
    )  # fmt: skip
    # Built-in tools (tool_loop.py): run only when enabled here AND declared by a request.
    tools: tuple[str, ...] = option(
        (), "built-in tools requests may use: python, browser (off unless named)"
    )
    max_tool_calls: int = option(
        MAX_TOOL_CALLS, "built-in tool calls run per reply, at most (%(default)s)", ge=0
    )
    tool_options: Any = None  # a tools.options.BuiltinToolOptions (its fields are flags too)
