"""What a new user hit in the first hour: each case failed before its fix."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.chat import ChatSession
from mlx_harmony_core.chat_log import ChatLog
from mlx_harmony_core.models.builder import PRESETS

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args, stdin=None, env=None):
    run_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlx_harmony_core.cli", *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        env=run_env,
    )


class _Out:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def _session(demo_engine, path=None, log=None):
    out, err = _Out(), _Out()
    s = ChatSession(
        engine=demo_engine,
        model_name="demo",
        prompt_config=mhc.PromptConfig(max_tokens=3),
        log=log or ChatLog(),
        path=path,
        out=out,
        err=err,
    )
    return s, out, err


# 1. \save never replaces a foreign file or another conversation
def test_save_refuses_foreign_and_other_chats(demo_engine, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("notes\n")
    s, _, _ = _session(demo_engine)
    s.reply("hello")
    with pytest.raises(ValueError, match="not a chat log"):
        s.save(str(notes))
    assert notes.read_text() == "notes\n"
    work = tmp_path / "work.json"
    other, _, _ = _session(demo_engine)
    other.reply("a")
    other.save(str(work))
    before = work.read_text()
    with pytest.raises(ValueError, match="another conversation"):
        s.save(str(work))
    assert work.read_text() == before
    s.save(str(tmp_path / "mine.json"))
    s.reply("again")  # its own file: saved again each turn
    assert len(json.loads((tmp_path / "mine.json").read_text())["messages"]) == 4


# 2. a path that cannot be written keeps the chat and the old path
def test_unwritable_path_keeps_the_conversation(demo_engine, tmp_path):
    good = tmp_path / "good.json"
    s, _, err = _session(demo_engine, path=good)
    s.reply("hello")
    with pytest.raises(OSError, match="conversation is kept"):
        s.save("/proc/nope/y.json")
    assert s.path == good
    s.reply("second")
    assert len(json.loads(good.read_text())["messages"]) == 4
    bad, _, err = _session(demo_engine, path=Path("/proc/nope/x.json"))
    bad.reply("hello")
    bad.reply("second")  # the chat goes on
    assert "could not save" in err.text and len(bad.log.messages) == 4


def test_chat_with_unwritable_log_exits_cleanly():
    r = cli(
        "chat",
        "--model",
        "demo",
        "--max-tokens",
        "3",
        stdin=b"hello\n\\save /proc/nope/y.json\nsecond\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(b"generated") + r.stderr.count(b"generated") == 2


# 3. quantized KV on every preset shape, each bit width
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_kv_bits_on_every_preset(preset, bits):
    import mlx.core as mx

    from mlx_harmony_core.kv_cache import make_cache

    head_dim, kv_heads = PRESETS[preset]["head_dim"], PRESETS[preset]["kv_heads"]
    cache = make_cache(type("M", (), {"layers": [0]})(), kv_bits=bits)[0]
    k = mx.random.normal((1, kv_heads, 5, head_dim))
    keys, _ = cache.update_and_fetch(k, k)
    assert keys.shape == k.shape
    assert float(mx.abs(keys - k).max()) < (0.6 if bits == 4 else 0.06)


def test_kv_bits_on_the_demo_model():
    for bits in ("4", "8"):
        r = cli("generate", "--model", "demo", "-p", "hi", "--max-tokens", "3", "--kv-bits", bits)
        assert r.returncode == 0, r.stderr


# 4. text that is not valid Unicode / UTF-8
def test_invalid_text_is_named(demo_engine):
    with pytest.raises(ValueError, match="unpaired surrogate U\\+D800"):
        demo_engine.generate([{"role": "user", "content": "a\ud800b"}], max_tokens=1)
    r = cli("generate", "--model", "demo", "--max-tokens", "2", stdin=b"caf\xe9\n")
    assert r.returncode == 2 and b"stdin is not valid UTF-8" in r.stderr
    r = cli("generate", "--model", "demo", "--max-tokens", "2", "-p", os.fsdecode(b"caf\xe9"))
    assert r.returncode == 2 and b"the --prompt text has the byte 0xe9" in r.stderr


# 5. messages name what the user typed
def test_messages_name_what_the_user_typed(tmp_path):
    r = cli("generate", "--model", "demo", "-p", "hi", "--temperature=-1")
    assert b"--temperature must be a number in [0, 100]" in r.stderr and r.returncode == 2
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    r = cli("make-test-model", str(tmp_path / "m"))
    assert b"--force" in r.stderr and b"overwrite=True (--force)" not in r.stderr
    r = cli("generate", "--profile", "x", "-p", "hi", env={"MLX_HARMONY_CORE_HOME": str(tmp_path)})
    assert (
        b"profiles.toml" in r.stderr and b"profiles.json" in r.stderr and b"--profiles" in r.stderr
    )
    r = cli("bench", "--prompt-tokens", "0")
    assert r.returncode == 2 and b"--prompt-tokens: must be >= 1" in r.stderr


def test_mistyped_keyword_names_no_internals(demo_engine):
    with pytest.raises(TypeError) as info:
        demo_engine.generate("hi", reasoning_efort="low")
    assert "reasoning_effort" in str(info.value) and "build_conversation" not in str(info.value)


# 6. max_tokens beyond the context is said and clamped
def test_max_tokens_beyond_the_context_is_clamped_visibly():
    r = cli(
        "generate",
        "--model",
        "demo",
        "-p",
        "hi",
        "--max-tokens",
        "100000000000000000000",
        "--context-length",
        "80",
    )
    assert r.returncode == 0, r.stderr
    assert re.search(
        rb"note: max_tokens 100000000000000000000 is more than the \d+ tokens left", r.stderr
    )


# 7. smaller rough edges
def test_small_rough_edges(tmp_path):
    assert cli("generate", "-v", "--model", "demo", "-p", "hi", "--max-tokens", "1").returncode == 0
    r = cli("bench", "--runs", "0")
    assert r.returncode == 2
    r = cli("generate", "--model", "demo", "-p", "  ")
    assert r.returncode == 2 and b"the prompt is empty" in r.stderr
    from mlx_harmony_core.chat_log import chat_path

    (tmp_path / "newdir").mkdir()
    assert chat_path(str(tmp_path / "newdir") + "/") == tmp_path / "newdir" / "chat.json"
    assert "``" not in cli("generate", "--help").stdout.decode()
    from mlx_harmony_core.cli import build_parser

    subs = build_parser()._subparsers._group_actions[0].choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)


def test_help_lists_only_public_names():
    import pydoc

    text = pydoc.render_doc(mhc, renderer=pydoc.plaintext)
    contents = text[text.find("PACKAGE CONTENTS") : text.find("CLASSES")]
    data = text[text.find("\nDATA") : text.find("\nVERSION")]
    text = contents + data
    for private in (
        r"(?<!_)annotations\b",
        r"ensure_vocab_env",
        r"libmhc_blas_shim",
        r"\n    mlx\n",
    ):
        assert not re.search(private, text), private


def test_readme_python_runs_as_written(tmp_path):
    text = README.read_text()  # the Python API's example (the server's need a server)
    block = re.search(r"```python\n(.*?)```", text[text.index("## Python API") :], re.S).group(1)
    r = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]


# 8. token ids outside the vocabulary
def test_out_of_vocabulary_ids_are_errors(demo_engine):
    with pytest.raises(mhc.InvalidRequestError, match="outside this model's vocabulary"):
        demo_engine.generate([100, 300000, 3], max_tokens=1)


def test_bench_prompt_comes_from_the_models_vocabulary():
    from mlx_harmony_core.bench import synthetic_prompt

    ids = synthetic_prompt(500, 49152, avoid=[0, 2])
    assert len(ids) == 500 and max(ids) < 49152 and not {0, 2} & set(ids)


# 10. tied embeddings count in the bandwidth line
def test_weight_bytes_count_tied_embeddings():
    import mlx.core as mx

    from mlx_harmony_core.bench import weight_bytes_per_token

    class M:
        def parameters(self):
            return {"embed_tokens": {"weight": mx.zeros((100, 10))}, "w": mx.zeros((10, 10))}

    assert weight_bytes_per_token(M(), {"tie_word_embeddings": True}) == 4400
    assert weight_bytes_per_token(M(), {}) == 400
