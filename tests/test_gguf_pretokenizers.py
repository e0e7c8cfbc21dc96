"""GGUF tokenizers against llama.cpp itself: every vocabulary of llama.cpp's own tokenizer
test set gives llama.cpp's ids for every test text, and our pre-tokenizer table is
llama.cpp's (``llama-vocab.cpp``: the same names, regexes and flags)."""

import re

import pytest

from mlx_harmony_core.errors import ModelLoadError
from mlx_harmony_core.models import gguf_tokenizer as gt
from mlx_harmony_core.models.gguf import read_gguf
from support.llama_vocab import llama_cpp_sources, vocab_cases

# Vocabularies llama.cpp tests that are not generative BPE/SentencePiece tokenizers (BERT's
# WordPiece; the rest have no .inp/.out).
_NOT_OURS = {"ggml-vocab-bert-bge.gguf"}


@pytest.fixture(scope="module")
def sources():
    return llama_cpp_sources()


def _vocabularies():
    # Named here (not globbed) so the test ids are stable before the download.
    return [
        "command-r",
        "deepseek-coder",
        "deepseek-llm",
        "falcon",
        "gemma-4",
        "gpt-2",
        "llama-bpe",
        "llama-spm",
        "mpt",
        "phi-3",
        "qwen2",
        "qwen35",
        "refact",
        "starcoder",
    ]


@pytest.mark.parametrize("name", _vocabularies())
def test_llama_cpp_vocabularies_tokenize_like_llama_cpp(sources, name):
    path = sources / "models" / f"ggml-vocab-{name}.gguf"
    tok = gt.gguf_tokenizer(read_gguf(path))
    cases = vocab_cases(path)
    assert len(cases) > 40
    for text, want in cases:
        assert tok.encode(text, add_special_tokens=False) == want, repr(text)


def test_every_vocabulary_with_expected_ids_is_covered(sources):
    found = {p.name for p in (sources / "models").glob("ggml-vocab-*.gguf.out")}
    want = {f"ggml-vocab-{n}.gguf.out" for n in _vocabularies()} | {f"{n}.out" for n in _NOT_OURS}
    assert found == want


# -- the table against llama-vocab.cpp ------------------------------------------------------------


def _cpp_string(literal: str) -> str:
    return literal.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def _llama_cpp_table(src: str) -> dict[str, tuple[tuple[str, ...], bool, bool]]:
    """tokenizer.ggml.pre -> (regexes, ignore_merges, add_bos), read from llama-vocab.cpp."""
    regexes: dict[str, tuple[str, ...]] = {}
    switch = src[src.index("struct llm_tokenizer_bpe : llm_tokenizer") :]
    switch = switch[: switch.index("default:")]
    for block in re.split(r"\bbreak;", switch):
        labels = re.findall(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):", block)
        body = re.search(r"regex_exprs = \{(.*?)\};", block, re.S)
        if labels and body:
            found = re.findall(r'^\s*"(.*)",', body.group(1), re.M)
            for label in labels:
                regexes[label] = tuple(_cpp_string(s) for s in found)
    table = {}
    chain = src[src.index('tokenizer_pre == "default"') :]
    chain = chain[: chain.index("unknown pre-tokenizer type")]
    for cond, body in re.findall(
        r"\(((?:\s*tokenizer_pre == \"[^\"]+\"\s*\|*)+)\)\s*\{(.*?)\}", chain, re.S
    ):
        names = re.findall(r'tokenizer_pre == "([^"]+)"', cond)
        kind = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);", body).group(1)
        flags = ("ignore_merges = true" in body, "add_bos = true" in body)
        for name in names:
            table[name] = (regexes.get(kind, ()), *flags)
    return table


# Where llama.cpp splits with hand-written code, our regex is one that splits the same way.
_BY_HAND = {
    # unicode_regex_split_custom_gpt2 keeps GPT-2's final "\s+" that the string lacks
    gt._GPT2_AFTER: (gt._GPT2,),
    r"\p{AFMoE_digits}": (gt._DIGITS_BY_THREE,),
    r"\d{1,3}(?=(?:\d{3})*\b)": (gt._DIGITS_BY_THREE,),
    r"\p{Han}+": (gt._KIMI_K2,),
}


def _as_we_write_it(regexes: tuple[str, ...]) -> tuple[str, ...]:
    if len(regexes) == 1 and regexes[0] in _BY_HAND:
        return _BY_HAND[regexes[0]]
    return tuple(_BY_HAND[r][0] if r in _BY_HAND and r != gt._GPT2_AFTER else r for r in regexes)


def test_the_pre_tokenizer_table_is_llama_cpps(sources):
    src = (sources / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    theirs = _llama_cpp_table(src)
    assert len(theirs) > 80
    ours = {k: v for k, v in gt.PRE_TOKENIZERS.items() if k != "gpt2"}  # gpt2: our alias
    unsupported = set(theirs) - set(ours)
    assert unsupported == set(gt._UNSUPPORTED), unsupported
    for name, rule in ours.items():
        if name == "default":
            continue
        regexes, ignore_merges, add_bos = theirs[name]
        assert rule.regexes == _as_we_write_it(regexes), name
        assert (rule.ignore_merges, rule.add_bos) == (ignore_merges, add_bos), name
    default = re.search(r"default:\s*// default regex.*?regex_exprs = \{(.*?)\};", src, re.S)
    assert gt.PRE_TOKENIZERS["default"].regexes == tuple(
        _cpp_string(s) for s in re.findall(r'^\s*"(.*)",', default.group(1), re.M)
    )


def test_llama_cpps_spelling_of_gpt2_and_the_smollm_rule_family():
    assert gt.pre_tokenizer("gpt-2") is gt.pre_tokenizer("gpt2")
    for name in ("starcoder", "refact", "smollm", "command-r"):
        assert gt.pre_tokenizer(name).regexes == (r"\p{N}", gt._GPT2_AFTER)


def test_unknown_pre_tokenizers_warn_and_use_gpt2(caplog):
    assert gt.pre_tokenizer("no-such-rule", "x.gguf").regexes == (gt._GPT2,)
    assert "not known" in caplog.text
    assert gt.pre_tokenizer(None) is gt.PRE_TOKENIZERS["default"]
    with pytest.raises(ModelLoadError, match="whitespace.*not supported"):
        gt.pre_tokenizer("whitespace", "x.gguf")


def test_every_regex_compiles():
    from tokenizers import Regex

    for name, rule in gt.PRE_TOKENIZERS.items():
        for r in rule.regexes:
            Regex(r)  # raises on a pattern Oniguruma cannot run
        assert rule.regexes, name
