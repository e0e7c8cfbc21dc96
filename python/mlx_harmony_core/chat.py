"""The interactive chat behind ``mlx-harmony-core chat``: streaming, commands, chat logs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .chat_format import ANSWER, REASONING
from .chat_log import ChatLog, chat_path
from .config import PromptConfig, resolve_settings
from .messages import check_text
from .tool_loop import ToolEvent

DIM = "\033[2m"
RESET = "\033[0m"
PROMPT = ">>> "
MORE = "... "

HELP = """\
Type a message and press Enter. Multi-line: end a line with \\ to continue it, or put
the text between lines of three double quotes (\"\"\").  Ctrl-C stops a reply; Ctrl-D quits.
Commands:
  \\help               this text
  \\set KEY=VALUE      change a setting (\\set temperature=0.7, \\set reasoning_effort=high,
                      \\set max_tokens=1024, \\set show_reasoning=false, \\set seed=none)
  \\show               the settings in effect
  \\save [NAME|PATH]   save the chat log now (and after every turn from then on)
  \\quit               leave"""


def parse_value(text: str) -> Any:
    """``\\set`` values: JSON when it parses (numbers, true/false, objects), ``none`` unsets."""
    text = text.strip()
    if text.lower() in ("none", "null", "default"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@dataclass
class ChatSession:
    """A conversation in progress: the engine, its settings layers and the log."""

    engine: Any
    model_name: str
    prompt_config: PromptConfig
    log: ChatLog
    cli: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    color: bool = False
    # Engine options for every reply that are not settings (speculative decoding).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # CLI flags are remembered in the log so that a resumed chat behaves the same.
        self.log.settings.update({k: v for k, v in self.cli.items() if v is not None})
        self.log.model = self.model_name
        self.settings = resolve_settings(prompt_config=self.prompt_config, chat=self.log.settings)
        self._apply()

    def _apply(self) -> None:
        if self.settings.context_length:
            self.engine.context_length = self.settings.context_length

    # -- commands ------------------------------------------------------------------------
    def set(self, assignment: str) -> str:
        """``KEY=VALUE``: validate, apply and remember (raises ``ValueError`` if invalid)."""
        key, sep, value = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError("use \\set KEY=VALUE, for example \\set temperature=0.7")
        if key == "model":
            raise ValueError("the model cannot change in a chat: start one with --model")
        updated = dict(self.log.settings)
        parsed = parse_value(value)
        if parsed is None:
            updated.pop(key, None)
        else:
            updated[key] = parsed
        settings = resolve_settings(prompt_config=self.prompt_config, chat=updated)
        if parsed is None and key not in PromptConfig.model_fields:
            raise ValueError(f"unknown setting {key!r}")
        self.log.settings, self.settings = updated, settings
        self._apply()
        return f"{key} = {getattr(settings, key)!r}"

    def show(self) -> str:
        rows = self.settings.model_dump(exclude_none=True)
        return (
            "\n".join(f"  {k} = {v!r}" for k, v in rows.items()) + f"\n  model = {self.model_name}"
        )

    def save(self, name: str | None = None) -> str:
        """Save now, to ``name`` (which then becomes the chat's file) or the current file.

        A foreign file or another conversation's log is never replaced, and a failed write
        keeps the previous file name: the conversation stays in memory either way.
        """
        path = chat_path(name) if name else self.path
        if path is None:
            raise ValueError("give a name: \\save NAME (or start with --chat NAME)")
        self.log.check_target(path)
        try:
            self.log.save(path)
        except OSError as exc:
            keep = f"; still saving to {self.path}" if self.path and path != self.path else ""
            raise OSError(
                f"could not write {path} ({exc.strerror or exc}){keep}; the conversation is "
                "kept: \\save ANOTHER-PATH to try elsewhere"
            ) from None
        self.path = path
        return f"saved to {self.path}"

    def autosave(self) -> None:
        """After a turn: save to the chat's file, reporting (never raising) a failure."""
        if self.path is None:
            return
        try:
            self.log.check_target(self.path)
            self.log.save(self.path)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.err.write(
                f"warning: could not save the chat to {self.path} ({reason}); the "
                "conversation is kept: \\save ANOTHER-PATH to save it elsewhere\n"
            )

    # -- a turn --------------------------------------------------------------------------
    def messages(self) -> list[dict[str, Any]]:
        return self.settings.prefix_messages() + self.log.chat_messages()

    def reply(self, text: str) -> Any:
        """Stream the answer to ``text``; Ctrl-C stops it and keeps what was said."""
        s = self.settings
        self.log.add_user(text)
        params = s.sampling()
        printer = ReplyPrinter(self.out, self.color, show_reasoning=s.show_reasoning is not False)
        parts: dict[str, list[str]] = {ANSWER: [], REASONING: []}
        completion = None
        try:
            req = self.engine.request(
                self.messages(),
                params,
                max_tokens=s.max_tokens,
                truncate=bool(s.truncate),
                max_reasoning_tokens=s.max_reasoning_tokens,
                **self.options,
                **s.render_options(),
            )
            note = req.clamp_note()
            if note:
                self.err.write(note + "\n")
            for event in self.engine.run(req, self._progress):
                if event.completion is not None:
                    completion = event.completion
                    break
                if isinstance(event, ToolEvent):  # a built-in tool call: shown dimmed
                    printer.tool(event)
                    continue
                if event.recipient:
                    continue
                parts.setdefault(event.kind, []).append(event.delta)
                printer.show(event.kind, event.delta)
        except KeyboardInterrupt:
            printer.end_reasoning()
            self.err.write("\n[stopped]\n")
            completion = _interrupted("".join(parts[ANSWER]), "".join(parts[REASONING]))
        printer.end_reasoning()
        self.out.write("\n")
        self.out.flush()  # the stats line (stderr) comes after the answer
        self.log.add_assistant(completion, model=self.model_name, params=params)
        if completion.finish_reason != "interrupted":
            self.err.write(printer.stats(completion))
        self.autosave()
        self.out.flush()
        return completion

    def _progress(self, done: int, total: int) -> None:
        prefill_progress(self.err, self.engine.prefill_step_size)(done, total)


class ReplyPrinter:
    """Writes a streamed reply: the answer as is, reasoning dimmed (or tagged) or hidden."""

    def __init__(self, out: TextIO, color: bool, *, show_reasoning: bool) -> None:
        self.out, self.color, self.show_reasoning = out, color, show_reasoning
        self._in_reasoning = False

    def show(self, kind: str, delta: str) -> None:
        if kind == REASONING:
            if not self.show_reasoning:
                return
            if not self._in_reasoning:
                self.out.write(DIM if self.color else "[reasoning] ")
                self._in_reasoning = True
        elif self._in_reasoning:
            self.end_reasoning()
            self.out.write("\n\n")
        self.out.write(delta)
        self.out.flush()

    def tool(self, event: ToolEvent, limit: int = 1200) -> None:
        """A built-in tool call as it starts (the code or arguments) and ends (its
        status, time and output, cut at ``limit`` characters), dimmed."""
        self.end_reasoning()
        if event.phase == "running":
            text = f"\n[{event.recipient}] {event.call.arguments.strip()}\n"
        else:
            r = event.result
            out = r.text if len(r.text) <= limit else r.text[:limit] + " [...]"
            text = f"[{event.recipient}: {r.status}, {r.duration_s:.1f} s]\n{out.rstrip()}\n\n"
        self.out.write(f"{DIM}{text}{RESET}" if self.color else text)
        self.out.flush()

    def end_reasoning(self) -> None:
        if self._in_reasoning and self.color:
            self.out.write(RESET)
        self._in_reasoning = False

    def stats(self, c: Any) -> str:
        """The line after a reply: prompt (cached), speeds, finish reason, peak memory."""
        t, u = c.timings, c.usage
        text = (
            f"[{u.prompt_tokens} prompt ({u.cached_prompt_tokens} cached), "
            f"{t.prefill_tokens_per_s:.0f} tok/s | {u.completion_tokens} generated, "
            f"{t.decode_tokens_per_s:.1f} tok/s | {c.finish_reason} | "
            f"peak {t.peak_memory_bytes / 2**20:.0f} MiB"
        )
        if u.drafted_tokens:
            text += f" | drafts {u.accepted_tokens}/{u.drafted_tokens} kept"
        text += "]\n"
        return f"{DIM}{text}{RESET}" if self.color else text


def prefill_progress(err: TextIO, step: int) -> Callable[[int, int], None]:
    """A progress callback that shows long prefills (more than one chunk) on ``err``."""

    def show(done: int, total: int) -> None:
        if total > step:
            end = "\n" if done + 1 >= total else ""
            err.write(f"\r[prefill {done}/{total} tokens]{end}")
            err.flush()

    return show


def _interrupted(text: str, reasoning: str) -> Any:
    from .request import Completion, Timings, Usage

    return Completion(text, reasoning, [], "interrupted", Usage(), Timings())


def read_message(read: Callable[[str], str]) -> str | None:
    """One message from the user (None at end of input); handles the multi-line forms."""
    line = read(PROMPT)
    if line.strip() == '"""':
        lines = []
        while (line := read(MORE)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\") and not lines[-1].startswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read(MORE))
    return "\n".join(lines)


def repl(session: ChatSession, read: Callable[[str], str] = input) -> int:
    """Read messages and commands until ``\\quit`` or end of input."""
    out, err = session.out, session.err
    err.write("Chat with " + session.model_name + ". \\help for commands, Ctrl-D to quit.\n")
    if session.log.messages:
        err.write(f"[resumed {len(session.log.messages)} messages from {session.path}]\n")
    while True:
        try:
            text = read_message(read)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line being typed
            out.write("\n")
            continue
        except UnicodeDecodeError as exc:  # a terminal or pipe that is not UTF-8
            err.write(
                f"error: the input is not valid UTF-8 (byte 0x{exc.object[exc.start]:02x}); "
                "set a UTF-8 locale or convert the input\n"
            )
            continue
        if not text.strip():
            continue
        try:
            check_text(text, "your message")
        except ValueError as exc:
            err.write(f"error: {exc}\n")
            continue
        if text.startswith("\\"):
            cmd, _, arg = text[1:].strip().partition(" ")
            try:
                if cmd in ("quit", "exit", "q"):
                    return 0
                if cmd == "help":
                    out.write(HELP + "\n")
                elif cmd == "set":
                    out.write(session.set(arg) + "\n")
                elif cmd == "show":
                    out.write(session.show() + "\n")
                elif cmd == "save":
                    out.write(session.save(arg.strip() or None) + "\n")
                else:
                    out.write(f"unknown command \\{cmd}; \\help lists them\n")
            except (ValueError, OSError) as exc:
                out.write(f"error: {exc}\n")
            out.flush()
            continue
        try:
            session.reply(text)
        except ValueError as exc:  # e.g. the conversation no longer fits the context
            session.log.messages.pop()
            err.write(f"error: {exc}\n")
