"""``mlx-harmony-core serve``: the OpenAI-compatible HTTP server.

Its flags are :class:`~mlx_harmony_core.server.ServerOptions`' (names, types, bounds,
defaults and help from the schema), plus the model and the loading flags ``generate``
and ``chat`` share.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..server.options import ServerOptions
from .common import (
    add_kv_flags,
    add_option_flags,
    load_engine,
    option_values,
    release_group,
    spec_options,
)
from .serve_models import build_pool, model_specs, several
from .tool_flags import add_tool_flags, tool_names, tool_options

logger = logging.getLogger(__name__)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand."""
    v = sub.add_parser("serve", parents=parents, help="OpenAI-compatible HTTP server")
    v.add_argument(
        "--model",
        "-m",
        action="append",
        help="model directory, .gguf file, HF repo id, or 'demo'; NAME=PATH names it; "
        "repeat to serve several (the first is the default)",
    )
    add_option_flags(v, ServerOptions)
    add_tool_flags(v, loop=False)  # --tools and --max-tool-calls are ServerOptions'
    add_kv_flags(v.add_argument_group("model loading"))
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Bind, load the model, serve until a signal; then exit at once."""
    from .. import __version__
    from ..progress import log_only
    from ..server import bind, serve

    log_only()  # a server's output is a log: loading progress as log lines
    values = option_values(args, ServerOptions)
    try:  # --tools python,browser (or python browser); the tools' own limits
        values["tools"] = tuple(n for t in values["tools"] for n in tool_names(t))
        values["tool_options"] = tool_options(args) if values["tools"] else None
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = values["api_key"] or os.environ.get("MLX_HARMONY_CORE_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not key:
        logger.warning(
            "serving on %s without --api-key: anyone who can reach it can use it", args.host
        )
    specs = model_specs(args, values)  # a bad -m / models file entry: an error, exit 2
    args.model = specs[0].path
    leader = args.group is None or args.group.leader
    # A taken port is one clear line, before loading (rank 0 alone serves).
    sock = bind(args.host, args.port) if leader else None
    engine: Any = None
    if not several(specs, values):
        engine = load_engine(
            args.model,
            args,
            prefix_cache_entries=values["prefix_cache_entries"],
            prefix_cache_bytes=values["prefix_cache_bytes"],
        )
    assert sock is not None
    store = None
    if values["prompt_cache_dir"] and engine is not None:  # prefixes kept across restarts
        from ..prompt_store import attach

        store = attach(engine, values["prompt_cache_dir"], max_bytes=values["prompt_cache_bytes"])
    name = args.model_name or specs[0].name
    values.update(
        model_name=name,
        api_key=key,
        default_max_tokens=min(values["default_max_tokens"], values["max_tokens_limit"]),
        version=__version__,
        **spec_options(args),
    )
    options = ServerOptions(**values)
    if engine is None:  # several models: each loads on first use (or now: --preload)
        engine = build_pool(args, specs, options)
    port = sock.getsockname()[1]
    print(f"serving {name} on http://{args.host}:{port}/v1", flush=True)
    if options.web:
        print(f"chat page: http://{args.host}:{port}/", flush=True)
    serve(engine, host=args.host, port=port, options=options, sock=sock)
    print("server stopped", flush=True)
    if store is not None:
        store.close()  # queued caches are written before the process exits
    elif hasattr(engine, "close_stores"):  # several models: each model's store
        engine.close_stores()
    release_group(args.group)
    sys.stderr.flush()
    # The generation thread is parked; skip interpreter teardown, which can race MLX's
    # own threads ("terminate called without an active exception").
    os._exit(0)
