"""The interactive chat, driven through a pseudo-terminal as a user would."""

import json
import os
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

TIMEOUT = 120


def spawn(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_harmony_core.cli", "chat", *args],
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 200),
    )
    child.expect_exact(">>> ")
    return child


def turn(child, text):
    child.sendline(text)
    child.expect(r"\| (length|stop) \| peak \d+ MiB\]")
    child.expect_exact(">>> ")


def test_two_turns_set_save_and_resume(tmp_path):
    log = tmp_path / "session.json"
    child = spawn("--chat", str(log), "--max-tokens", "6", "--seed", "3")
    turn(child, "Hello there")
    assert json.loads(log.read_text())["messages"][1]["role"] == "assistant"  # saved each turn
    child.sendline("\\set temperature=0.25")
    child.expect_exact("temperature = 0.25")
    child.sendline("\\set top_p=7")
    child.expect("error: .*top_p")
    child.sendline("\\help")
    child.expect_exact("\\set KEY=VALUE")
    child.sendline("first line\\")
    child.expect_exact("... ")
    child.sendline("second line")
    child.expect(r"\| (length|stop) \| peak")
    child.expect_exact(">>> ")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    data = json.loads(log.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    assert data["messages"][2]["content"] == "first line\nsecond line"
    assert data["settings"] == {"max_tokens": 6, "seed": 3, "temperature": 0.25}
    assert data["messages"][3]["params"]["temperature"] == 0.25

    # Resume: the log's settings apply, a flag overrides them, the history is kept.
    child = spawn("--chat", str(log), "--top-k", "5")
    child.sendline("\\show")
    child.expect_exact("temperature = 0.25")
    child.expect_exact("top_k = 5")
    turn(child, "And again")
    child.sendeof()
    child.expect(pexpect.EOF)
    data = json.loads(log.read_text())
    assert len(data["messages"]) == 6 and data["settings"]["top_k"] == 5
    # A new process: what the first session saw comes back from the cache kept beside the
    # log (the prompt cache on disk), not prefilled again.
    assert data["messages"][5]["usage"]["cached_prompt_tokens"] > 0


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation(tmp_path):
    log = tmp_path / "c.json"
    child = spawn("--chat", str(log), "--max-tokens", "100000", "--context-length", "100000")
    child.sendline("Tell me everything")
    child.expect(r"\S{20}")  # some of the reply has streamed
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(">>> ")
    child.sendline("\\set max_tokens=4")
    child.expect_exact("max_tokens = 4")
    turn(child, "Short one")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    messages = json.loads(log.read_text())["messages"]
    assert messages[1]["finish_reason"] == "interrupted" and messages[1]["content"]
    assert messages[3]["finish_reason"] == "length"


def test_corrupt_log_is_reported_and_left_alone(tmp_path):
    log = tmp_path / "c.json"
    log.write_text('{"format": "mlx-harmony-core-chat", "vers')
    env = {**os.environ}
    out = pexpect.run(
        f"{sys.executable} -m mlx_harmony_core.cli chat --chat {log}",
        env=env,
        encoding="utf-8",
        timeout=TIMEOUT,
        withexitstatus=True,
    )
    text, status = out
    assert status == 2 and "corrupt" in text and "Traceback" not in text
    assert log.read_text() == '{"format": "mlx-harmony-core-chat", "vers'


def test_read_message_multiline_forms():
    from mlx_harmony_core.chat import read_message

    lines = iter(['"""', "a", "  b", '"""', "x\\", "y", "\\set top_k=3"])
    read = lambda prompt: next(lines)  # noqa: E731
    assert read_message(read) == "a\n  b"
    assert read_message(read) == "x\ny"
    assert read_message(read) == "\\set top_k=3"


def test_generate_uses_prompt_config_and_flags_win(tmp_path):
    import subprocess

    config = tmp_path / "p.json"
    config.write_text('{"max_tokens": 3, "temperature": 0, "instructions": "Hi {user}"}')
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "generate", "-p", "x", "--json"]
    out = subprocess.run(
        [*cmd, "--prompt-config", str(config)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 3
    out = subprocess.run(
        [*cmd, "--prompt-config", str(config), "--max-tokens", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 5
    config.write_text('{"max_tokens": 3, "colour": 1}')
    out = subprocess.run([*cmd, "--prompt-config", str(config)], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown field 'colour'" in out.stderr


def test_builtin_tools_shown_dimmed_logged_and_resumed(tmp_path):
    """chat --tools python in a terminal: each call and its result dimmed, recorded in the
    log; a resumed chat goes on (the model is the demo one, scripted to call python)."""
    from pathlib import Path

    call = "<|channel|>analysis to=python code<|message|>{}<|call|>"
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                call.format("x = 6 * 7"),
                call.format("print(x)"),
                "<|channel|>final<|message|>It is 42.<|return|>",
            ]
        )
    )
    log = tmp_path / "tools.json"
    runner = str(Path(__file__).parent / "support" / "scripted_chat.py")
    args = ["--chat", str(log), "--tools", "python", "--max-tokens", "200"]

    def start():
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
        child = pexpect.spawn(
            sys.executable,
            [runner, str(script), "chat", *args],
            env=env,
            encoding="utf-8",
            timeout=TIMEOUT,
            dimensions=(40, 200),
        )
        child.expect_exact(">>> ")
        return child

    child = start()
    child.sendline("what is 6 * 7?")
    child.expect_exact("\x1b[2m\r\n[python] x = 6 * 7")
    child.expect_exact("[python: completed")
    child.expect_exact("[python] print(x)")
    child.expect(r"\[python: completed, [0-9.]+ s\]\r\n42\r\n")
    child.expect_exact("It is 42.")
    turn_end = r"\| (length|stop) \| peak \d+ MiB\]"
    child.expect(turn_end)
    child.expect_exact(">>> ")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    data = json.loads(log.read_text())
    reply = data["messages"][1]
    assert reply["content"] == "It is 42."
    calls = reply["builtin_calls"]
    assert [(c["recipient"], c["arguments"], c["status"]) for c in calls] == [
        ("python", "x = 6 * 7", "completed"),
        ("python", "print(x)", "completed"),
    ]
    assert calls[1]["output"].strip() == "42"

    child = start()  # resumed: the history is kept, the tools run again
    child.sendline("again?")
    child.expect_exact("It is 42.")
    child.expect(turn_end)
    child.expect_exact(">>> ")
    child.sendline("\\quit")  # (a Ctrl-D sent before the prompt reads can be lost)
    child.expect(pexpect.EOF)
    data = json.loads(log.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"] * 2
    assert len(data["messages"][3]["builtin_calls"]) == 2
