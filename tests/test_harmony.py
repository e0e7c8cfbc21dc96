"""Harmony rendering equals openai_harmony's; the stream parser never raises."""

import os
import subprocess
import sys

import numpy as np
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

import mlx_harmony_core as mhc
from mlx_harmony_core._vocab import VOCAB_NAME, VOCAB_SHA256, _sha256
from mlx_harmony_core.harmony import CALL, RETURN, HarmonyStream


def test_vocab_is_shipped_and_used_offline():
    mhc.load_encoding()  # unpacks the shipped vocabulary and points tiktoken at it
    base = os.environ["TIKTOKEN_ENCODINGS_BASE"]
    with open(os.path.join(base, VOCAB_NAME), "rb") as f:
        data = f.read()
    assert _sha256(data) == VOCAB_SHA256


def test_user_setting_of_tiktoken_base_is_respected(tmp_path):
    env = {**os.environ, "TIKTOKEN_ENCODINGS_BASE": str(tmp_path)}
    code = "import mlx_harmony_core, os; print(os.environ['TIKTOKEN_ENCODINGS_BASE'])"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(tmp_path)


def test_corrupted_cached_vocab_is_replaced(tmp_path):
    home = tmp_path / "home"
    (home / "vocab").mkdir(parents=True)
    (home / "vocab" / VOCAB_NAME).write_text("garbage")
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["MLX_HARMONY_CORE_HOME"] = str(home)
    code = "import mlx_harmony_core as m; print(len(m.load_encoding().encode('hello world')))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "2"
    assert _sha256((home / "vocab" / VOCAB_NAME).read_bytes()) == VOCAB_SHA256


def test_render_equals_openai_harmony(encoding):
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "How are you? 🙂"},
    ]
    ours = mhc.render_prompt(
        messages, reasoning_effort="high", conversation_start_date="2026-11-25"
    )
    conv = Conversation.from_messages(
        [
            Message.from_role_and_content(
                Role.SYSTEM,
                SystemContent.new()
                .with_reasoning_effort(ReasoningEffort.HIGH)
                .with_conversation_start_date("2026-11-25"),
            ),
            Message.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer in French.")
            ),
            Message.from_role_and_content(Role.USER, "Hi there"),
            Message.from_role_and_content(Role.ASSISTANT, "Bonjour !").with_channel("final"),
            Message.from_role_and_content(Role.USER, "How are you? 🙂"),
        ]
    )
    theirs = encoding.render_conversation_for_completion(conv, Role.ASSISTANT)
    assert ours == list(theirs)


def test_prompt_string_is_one_user_message(encoding):
    assert mhc.render_prompt("Hello") == mhc.render_prompt([{"role": "user", "content": "Hello"}])


def _tokens(encoding, text):
    return encoding.encode(text, allowed_special="all")


def test_stream_parses_channels(encoding):
    toks = _tokens(
        encoding,
        "<|channel|>analysis<|message|>Let me think.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>",
    )
    s = HarmonyStream(encoding)
    deltas = [d for t in toks for d in s.push(t)] + s.finish()
    assert "".join(d.text for d in deltas if d.channel == "analysis") == "Let me think."
    assert "".join(d.text for d in deltas if d.channel == "final") == "Hello there!"
    assert s.text("final") == "Hello there!" and not s.raw


def test_stream_parses_tool_call(encoding):
    toks = _tokens(
        encoding,
        '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>',
    )
    s = HarmonyStream(encoding)
    for t in toks:
        s.push(t)
    calls = s.tool_calls()
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].parsed_arguments() == {"city": "Paris"}
    assert s.text("final") == ""


def test_return_after_end_does_not_raise(encoding):
    toks = _tokens(encoding, "<|channel|>final<|message|>Done.<|end|>") + [RETURN]
    s = HarmonyStream(encoding)
    for t in toks:
        s.push(t)
    s.finish()
    assert s.text("final").startswith("Done.")


def test_random_tokens_become_final_text(encoding):
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(0, 199990, size=200)]
    s = HarmonyStream(encoding)
    out = "".join(d.text for t in toks for d in s.push(t)) + "".join(d.text for d in s.finish())
    assert s.raw
    assert out == s.text("final")
    assert out == encoding.decode(toks)


def test_unfinished_header_is_flushed_as_text(encoding):
    toks = _tokens(encoding, "Just plain words")
    s = HarmonyStream(encoding)
    for t in toks:
        assert s.push(t) == []  # still looks like a header
    assert "".join(d.text for d in s.finish()) == "Just plain words"


def test_call_token_is_special():
    assert CALL == 200012 and RETURN == 200002


def test_hf_tokenizer_and_chat_template_match_harmony(encoding):
    """make-test-model writes tokenizer.json and a chat template (for Hugging Face tools such
    as mlx_lm.server): they tokenize and render exactly as our Harmony path does."""
    import random

    from transformers import AutoTokenizer

    from mlx_harmony_core.harmony import HarmonyFormat
    from mlx_harmony_core.models.builder import demo_model_path

    tok = AutoTokenizer.from_pretrained(str(demo_model_path()))
    rnd = random.Random(0)
    alphabet = "abcXYZ 0123456789.,;:'\"!?\n\t  éüß日本語😀-_/\\()[]{}<>|@#$%^&*"
    texts = ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 80))) for _ in range(300)]
    texts += ["don't WON'T I'm", "  leading spaces", "trailing\n\n\n", "<|start|>user<|message|>x"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == encoding.encode(text, allowed_special="all"), repr(text)
        assert tok.decode(ids) == text
    fmt = HarmonyFormat()
    for messages in (
        [{"role": "user", "content": "Hi there"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use French."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ],
    ):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.encode(text, add_special_tokens=False) == fmt.render(messages)
    assert tok.eos_token == "<|return|>"
