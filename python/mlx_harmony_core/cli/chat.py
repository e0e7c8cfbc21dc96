"""``mlx-harmony-core chat``: interactive chat with streaming, commands and chat logs."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from .common import (
    add_prompt_flags,
    add_sampling_flags,
    cli_settings,
    load_engine,
    model_and_config,
    spec_options,
)
from .tool_flags import add_tool_flags, tool_options


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``chat`` subcommand."""
    c = sub.add_parser(
        "chat", parents=parents, help="interactive chat with streaming, commands and chat logs"
    )
    c.add_argument(
        "--chat",
        default=None,
        help="chat log NAME (or path): resumed if it exists, saved each turn",
    )
    add_prompt_flags(c, chat=True)
    add_sampling_flags(c)
    add_tool_flags(c)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The chat loop (see :mod:`mlx_harmony_core.chat`)."""
    from ..chat import ChatSession, repl
    from ..chat_log import ChatLog, chat_path

    path = chat_path(args.chat) if args.chat else None
    log = ChatLog.load(path) if path is not None and path.exists() else ChatLog()
    model, config = model_and_config(args, chat_model=log.model)
    if args.profile:
        log.profile = args.profile
    options = spec_options(args)
    engine = load_engine(model, args)
    if args.tools:  # the python variables and pages of this chat persist across its turns
        try:
            engine.enable_tools(args.tools, tool_options(args))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        options.update(builtin_tools=args.tools, tool_session=f"chat_{log.id}")
        if args.max_tool_calls is not None:
            options["max_tool_calls"] = args.max_tool_calls
    session = ChatSession(
        engine=engine,
        model_name=model,
        prompt_config=config,
        log=log,
        cli=cli_settings(args),
        path=path,
        color=sys.stdout.isatty(),
        options=options,
    )
    store = None
    if path is not None and session.engine.runner.group is None:
        from ..prompt_store import attach, beside

        # The conversation's KV cache beside its log: a resumed chat prefills only what is new.
        try:
            store = attach(session.engine, beside(path), min_tokens=1, max_entries=1)
        except ValueError as exc:  # say so; the chat itself goes on
            print(f"warning: the chat's KV cache is not kept on disk: {exc}", file=sys.stderr)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:
        return repl(session)
    finally:
        if store is not None:
            store.close()
        engine.close_tools()
