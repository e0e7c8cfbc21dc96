"""``mlx-harmony-core generate``: one reply to one prompt (Harmony formatted for GPT-OSS)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    add_prompt_flags,
    add_sampling_flags,
    cli_settings,
    load_engine,
    model_and_config,
    spec_options,
)


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``generate`` subcommand."""
    g = sub.add_parser(
        "generate", parents=parents, help="one-shot generation (Harmony formatted for GPT-OSS)"
    )
    g.add_argument("--prompt", "-p", default=None, help="user message (default: read stdin)")
    g.add_argument("--json", action="store_true", help="print the whole completion as JSON")
    g.add_argument(
        "--stop", action="append", default=None, help="stop string for the answer (repeatable)"
    )
    shape = g.add_argument_group("structured output (enforced token by token)")
    one = shape.add_mutually_exclusive_group()
    one.add_argument(
        "--json-schema",
        default=None,
        metavar="SCHEMA",
        help="the answer is JSON valid against SCHEMA (a file, inline JSON, or 'object')",
    )
    one.add_argument("--regex", default=None, help="the answer matches this regular expression")
    one.add_argument("--grammar", default=None, metavar="FILE", help="a Lark grammar file")
    add_prompt_flags(g)
    add_sampling_flags(g)
    g.set_defaults(func=run)


def _read_prompt(given: str | None) -> str:
    """The user's message from --prompt or stdin, as valid text, or a clear error."""
    from ..messages import check_text

    if given is not None:
        text = check_text(given, "the --prompt text")
    else:
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"stdin is not valid UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                f"{exc.start}); convert it first, e.g. with iconv"
            ) from None
    if not text.strip():
        raise ValueError("the prompt is empty: pass --prompt TEXT or pipe the text on stdin")
    return text


def _constraint(args: argparse.Namespace) -> dict[str, Any]:
    """--json-schema / --regex / --grammar as the engine's constraint arguments."""
    if args.json_schema is not None:
        text = args.json_schema
        if text == "object":
            return {"response_format": {"type": "json_object"}}
        if not text.lstrip().startswith("{"):
            text = _read_file(text, "--json-schema")
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--json-schema is not valid JSON: {exc}") from None
        spec = {"name": "response", "schema": schema}
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _read_file(args.grammar, "--grammar")}
    return {}


def _read_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{flag}: cannot read {path!r}: {exc}") from None


def prefill_bar(step: int) -> Callable[[int, int], None]:
    """A progress callback for :meth:`Engine.run`: a bar (a terminal) or log lines over a
    prefill longer than one chunk of ``step`` tokens; nothing when quiet."""
    from ..progress import ProgressBar

    bars: list[ProgressBar] = []

    def show(done: int, total: int) -> None:
        if not bars:
            bars.append(ProgressBar(total, "prefill", unit="tok", min_total=step + 1))
        bar, last = bars[0], done + 1 >= total  # the last prompt token runs with decoding
        bar.update(max(0, (total if last else done) - bar.done))
        if last:
            bar.close()

    return show


def run(args: argparse.Namespace) -> int:
    """Generate one reply and print it (or the completion as JSON)."""
    from ..chat import ReplyPrinter
    from ..config import resolve_settings

    model, config = model_and_config(args)
    settings = resolve_settings(prompt_config=config, cli=cli_settings(args))
    engine = load_engine(model, args)
    if settings.context_length:
        engine.context_length = settings.context_length
    prompt = _read_prompt(args.prompt)
    printer = ReplyPrinter(
        sys.stdout, sys.stdout.isatty(), show_reasoning=bool(settings.show_reasoning)
    )
    completion = None
    messages = [*settings.prefix_messages(), {"role": "user", "content": prompt}]
    req = engine.request(
        messages,
        settings.sampling(),
        max_tokens=settings.max_tokens,
        stop=args.stop,
        truncate=bool(settings.truncate),
        max_reasoning_tokens=settings.max_reasoning_tokens,
        **_constraint(args),
        **spec_options(args),
        **settings.render_options(),
    )
    note = req.clamp_note()
    if note:
        print(note, file=sys.stderr)
    progress = None if args.json else prefill_bar(engine.prefill_step_size)
    for event in engine.run(req, progress):
        if event.completion is not None:
            completion = event.completion
        elif not args.json and not event.recipient:
            printer.show(event.kind, event.delta)
    assert completion is not None
    if args.json:
        json.dump(completion.to_dict(), sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    printer.end_reasoning()
    sys.stdout.write("\n")
    sys.stdout.flush()  # the stats line (stderr) comes after the answer
    sys.stderr.write(printer.stats(completion))
    return 0
