"""Stop matching and streaming detokenization against brute-force references."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx_harmony_core as mhc
from mlx_harmony_core import _core
from mlx_harmony_core.harmony import harmony_detokenizer, o200k_harmony_bytes
from mlx_harmony_core.testing import ScriptedModel


# -- a brute-force reference of the streaming semantics ------------------------------------------
def reference_stop(text: str, stops: list[str], include_stop: bool = False):
    """Stop at the earliest end position; among matches ending there, the longest."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include_stop else text[: end - len(s)]), s
    return text, None


def reference_held(text: str, stops: list[str]) -> str:
    """The longest suffix of `text` that is a proper prefix of some stop string."""
    for k in range(min(len(text), max(map(len, stops))), 0, -1):
        if any(s.startswith(text[-k:]) and len(s) > k for s in stops):
            return text[-k:]
    return ""


alphabet = st.sampled_from(list("abcab ") + ["é", "中", "😀", "\n"])
texts = st.text(alphabet=alphabet, max_size=60)
stop_sets = st.lists(st.text(alphabet=alphabet, min_size=1, max_size=5), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(
    text=texts,
    stops=stop_sets,
    cuts=st.lists(st.integers(0, 60), max_size=12),
    include=st.booleans(),
)
def test_streamed_output_equals_reference(text, stops, cuts, include):
    expected, expected_match = reference_stop(text, stops, include)
    points = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(points, points[1:], strict=False)]
    matcher = mhc.StopStrings(stops, include_stop=include)
    out, seen, match = "", "", None
    for piece in pieces:
        safe, match = matcher.push(piece)
        out += safe
        seen += piece
        assert expected.startswith(out), "emitted text that is later retracted"
        if match is not None:
            break
        assert matcher.held == reference_held(seen, stops), "hold-back is not exact"
        assert out + matcher.held == seen
    if match is None:
        out += matcher.flush()
    assert (out, match) == (expected, expected_match)


def test_stop_split_across_pieces_and_overlaps():
    m = mhc.StopStrings(["abc", "bc", "xyz"])
    assert m.push("hello a") == ("hello ", None)
    assert m.held == "a"
    assert m.push("b") == ("", None)
    assert m.push("cdef") == ("", "abc")  # ends with "bc" too: the longest (earliest) wins


def test_include_stop_and_multibyte():
    m = mhc.StopStrings(["😀!"], include_stop=True)
    assert m.push("hi 😀") == ("hi ", None)
    assert m.push("! tail") == ("😀!", "😀!")


def test_flush_releases_held_text():
    m = mhc.StopStrings(["</answer>"])
    assert m.push("done </ans") == ("done ", None)
    assert m.flush() == "</ans"


@pytest.mark.parametrize("bad, error", [([""], ValueError), ([], ValueError), ([3], TypeError)])
def test_bad_stop_strings(bad, error):
    with pytest.raises(error):
        mhc.StopStrings(bad)


# -- token-id sequences ---------------------------------------------------------------------------
def test_token_stops_equal_mlx_lm_stop_sequences():
    from mlx_lm.generate import StopSequences

    rng = random.Random(0)
    for _ in range(300):
        seqs = [
            [rng.randrange(6) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 5))
        ]
        stream = [rng.randrange(6) for _ in range(50)]
        ours, theirs = mhc.TokenStops(seqs), StopSequences(seqs).matcher()
        for tok in stream:
            assert (ours.push(tok) is not None) == theirs.advance(tok), (seqs, stream)


def test_token_stops_report_longest_sequence():
    t = mhc.TokenStops([[2, 3], [1, 2, 3], [9]])
    assert [t.push(x) for x in [5, 1, 2, 3, 9]] == [None, None, None, 1, 2]


def test_bad_token_stops():
    with pytest.raises(ValueError):
        mhc.TokenStops([])
    with pytest.raises(ValueError):
        mhc.TokenStops([[1], []])


# -- detokenizer ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detok():
    return harmony_detokenizer()


def stream_decode(d, tokens):
    d.reset()
    return "".join(d.push(t) for t in tokens) + d.flush()


def test_detokenizer_equals_encoding_decode_on_random_tokens(encoding, detok):
    rng = np.random.default_rng(0)
    for _ in range(200):
        toks = [int(t) for t in rng.integers(0, 199998, size=rng.integers(1, 30))]
        assert stream_decode(detok, toks) == encoding.decode(toks)


def test_detokenizer_splits_emoji_and_cjk(encoding, detok):
    text = "Emoji 😀👍🏽 and 中文字符 and 日本語 🇫🇷 done"
    toks = encoding.encode(text)
    pieces = [detok.push(t) for t in toks]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    # Byte-level tokens: the same text, one byte per token.
    table = o200k_harmony_bytes()
    byte_ids = {b: i for i, b in enumerate(table) if len(b) == 1}
    ids = [byte_ids[bytes([b])] for b in text.encode()]
    assert stream_decode(detok, ids) == text


def test_detokenizer_specials_and_bounds(detok):
    assert stream_decode(detok, [200006, 200008]) == "<|start|><|message|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        detok.push(201088)
    with pytest.raises(ValueError):
        detok.push(-1)


def test_utf8_decoder_matches_python_replacement():
    rng = np.random.default_rng(1)
    pool = [bytes([b]) for b in range(256)] + [s.encode() for s in "é中😀"]
    for _ in range(2000):
        data = b"".join(rng.choice(pool) for _ in range(rng.integers(0, 12)))
        assert _core.decode_utf8(data, True)[0] == data.decode("utf-8", "replace")
        d = mhc.Detokenizer([bytes([b]) for b in range(256)])
        assert "".join(d.push(b) for b in data) + d.flush() == data.decode("utf-8", "replace")


def test_hf_byte_level_tokenizer_table():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(["hello world 😀 中文 ünïcödé " * 20], trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    from mlx_harmony_core.stopping import tokenizer_bytes

    d = mhc.Detokenizer(tokenizer_bytes(hf))
    rng = np.random.default_rng(2)
    for _ in range(100):
        ids = [int(i) for i in rng.integers(1, len(hf), size=rng.integers(1, 20))]
        assert stream_decode(d, ids) == hf.decode(ids)


# -- end to end ----------------------------------------------------------------------------------
def scripted(encoding, text):
    engine = mhc.Engine(ScriptedModel([], 0), encoding=encoding)
    n = len(engine.render("Hi"))
    engine.model = ScriptedModel(encoding.encode(text, allowed_special="all"), n)
    return engine


def test_stop_string_spanning_three_tokens_stops_generation(encoding):
    text = "<|channel|>final<|message|>The answer is FOOBARBAZ and then more text<|return|>"
    stop = " FOOBARBAZ"
    toks = encoding.encode(stop)
    assert len(toks) >= 3  # the stop string really spans several tokens
    engine = scripted(encoding, text)
    c = engine.generate(
        "Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100, stop=[stop, "zzz"]
    )
    assert c.finish_reason == "stop" and c.stop_sequence == stop
    assert c.text == "The answer is"
    assert len(c.tokens) < len(encoding.encode(text, allowed_special="all")) - 4  # stopped early
    events = list(
        scripted(encoding, text).stream(
            "Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100, stop=stop
        )
    )
    streamed = "".join(e.delta for e in events if e.channel == "final")
    assert streamed == "The answer is" and events[-1].completion.stop_sequence == stop
    assert all("FOO" not in e.delta for e in events)


def test_stop_strings_ignore_reasoning(encoding):
    text = "<|channel|>analysis<|message|>STOP here is fine<|end|><|start|>assistant<|channel|>final<|message|>ok STOP no<|return|>"
    c = scripted(encoding, text).generate(
        "Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100, stop="STOP"
    )
    assert c.reasoning == "STOP here is fine" and c.text == "ok " and c.finish_reason == "stop"


def test_held_text_is_released_at_length_limit(encoding):
    text = "<|channel|>final<|message|>abc STO"
    c = scripted(encoding, text).generate(
        "Hi",
        mhc.SamplingParams(temperature=0.0),
        max_tokens=len(encoding.encode(text, allowed_special="all")),
        stop="STOP",
    )
    assert c.finish_reason == "length" and c.text == "abc STO"


def test_user_token_stop_sequence(encoding):
    text = "<|channel|>final<|message|>one two three four<|return|>"
    seq = encoding.encode(" three")
    c = scripted(encoding, text).generate(
        "Hi", mhc.SamplingParams(temperature=0.0), max_tokens=100, stop_tokens=[seq]
    )
    assert c.finish_reason == "stop" and c.tokens[-len(seq) :] == seq
