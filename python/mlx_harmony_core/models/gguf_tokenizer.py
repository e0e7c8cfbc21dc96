"""A GGUF file's tokenizer, built from its ``tokenizer.ggml.*`` metadata as llama.cpp reads it.

BPE vocabularies split text first with the regexes llama.cpp's ``llama-vocab.cpp`` picks for
the file's ``tokenizer.ggml.pre`` (the same strings, and for the rules llama.cpp runs with
hand-written code, a regex that splits the same way), then byte-level BPE; SentencePiece
vocabularies (``llama``) rebuild their merges from the pieces' scores. The result is a Hugging
Face fast tokenizer, so the rest of the code treats GGUF and mlx-lm models alike.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelLoadError

if TYPE_CHECKING:
    from .gguf import GGUFFile

__all__ = [
    "PRE_TOKENIZERS",
    "PreTokenizer",
    "eos_ids",
    "gguf_tokenizer",
    "gguf_tokenizer_wrapper",
    "pre_tokenizer",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one ``tokenizer.ggml.pre`` family.

    ``regexes`` run one after another, each splitting the pieces the previous left
    (matches and the text between them both become pieces). ``ignore_merges``: a word that
    is a whole vocabulary entry is taken as is. ``add_bos``: the default when the file has
    no ``tokenizer.ggml.add_bos_token``. ``byte_level``: GPT-2's byte-to-unicode mapping
    (``False``: raw UTF-8 pieces with spaces as ``▁``, SentencePiece style).
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False
    byte_level: bool = True


# The regexes, as llama-vocab.cpp writes them (llama.cpp's rules are in comments where its
# code, not its regex engine, does the split).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
# GPT-2's rule: llama.cpp's string lacks the final "|\s+", but its hand-written splitter
# (unicode_regex_split_custom_gpt2) behaves as if it were there, as GPT-2's own regex does.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The same rule as a second pass (after digits are split off): llama.cpp's exact string.
_GPT2_AFTER = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_JAIS2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|"
    r"\s{16}(?!\S)|\s{8}(?!\S)|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_DEEPSEEK3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
_SPARK2_5 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
    "\\p{N}",
)
_YOUTU = (
    "[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
)
_DEEPSEEK_CODER = (
    "[\r\n]",
    "\\s?\\p{L}+",
    "\\s?\\p{P}+",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}",
)
_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_AFTER, r"[0-9][0-9][0-9]")
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2_AFTER)
_PORO = (" ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+",)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|"
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CHAMELEON = (
    r"<sentinel:[0-9]+>",
    r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
    r"([\t\n]|    |  )",
    r"\p{N}",
    r"[\p{P}!-/:-@\[-`{-~]",
    _GPT2_AFTER,
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    + f"{_CONTRACTIONS}?"
    + r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    + f"{_CONTRACTIONS}?"
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GRANITE_EMB_MULTI = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
    + f"{_CONTRACTIONS}?"
    + r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])([^A-Z]))*"
    + f"{_CONTRACTIONS}?"
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp splits these digits by hand (unicode_regex_split_custom_afmoe): a run of digits
# gives its first len % 3 digits (if any), then groups of three.
_DIGITS_BY_THREE = r"\p{N}{1,3}(?=(?:\p{N}{3})*(?!\p{N}))"
_TINY_AYA = (
    _DIGITS_BY_THREE,
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    + f"{_CONTRACTIONS}?"
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    + f"{_CONTRACTIONS}?"
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
# Kimi K2: llama.cpp runs its tokenizer's regex by hand (unicode_regex_split_custom_kimi_k2);
# this is that regex (Oniguruma has the character-class intersections it needs).
_KIMI_K2 = (
    r"[\p{Han}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SUPERBPE = (r"\p{N}+", r"(?=(\d{3})+(?!\d))")
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
_UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_AFMOE = (
    _DIGITS_BY_THREE,
    "[\u4e00-\u9fff\u3400-\u4dbf\u8c48-\ufaff\u3040-\u309f\u30a0-\u30ff\uff65-\uff9f\u2f00-\u2fdf\u0e40-\u0e7f\u0e80-\u0eff\u1780-\u17ff\u1000-\u109f\uaa60-\uaa7f\ua9e0-\ua9ff\uac00-\ud7af\u1100-\u11ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
)
_LINES = r"[^\n]+|[\n]+"
_EXAONE_MOE = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"
)
_MINICPM5 = (
    r"\p{N}{1,3}",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
)
# tokenizer.ggml.pre "default" (and files without one).
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_AFTER, r"\p{N}+", r"[0-9][0-9][0-9]")


def _rule(*regexes: str, **flags: bool) -> PreTokenizer:
    return PreTokenizer(tuple(regexes), **flags)


_LLAMA3_RULE = _rule(_LLAMA3, ignore_merges=True, add_bos=True)
_GPT2_RULE = _rule(_GPT2)
_QWEN2_RULE = _rule(_QWEN2)
_DIGITS_RULE = _rule(*_DIGITS_THEN_GPT2)
_GPT4O_RULE = _rule(_GPT4O)
_SPM_LINES = _rule(_LINES, byte_level=False)

# tokenizer.ggml.pre -> how llama.cpp splits (llama-vocab.cpp's table, its spellings).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _rule(*_DEFAULT),
    "minicpm5": _rule(*_MINICPM5, ignore_merges=True),
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        _LLAMA3_RULE,
    ),
    "deepseek-llm": _rule(*_DEEPSEEK_LLM),
    "deepseek-coder": _rule(*_DEEPSEEK_CODER),
    **dict.fromkeys(("deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"), _rule(*_DEEPSEEK3)),
    "spark2_5": _rule(*_SPARK2_5),
    "youtu": _rule(*_YOUTU, ignore_merges=True),
    "falcon": _rule(*_FALCON),
    "mpt": _GPT2_RULE,
    "starcoder": _DIGITS_RULE,
    **dict.fromkeys(
        (
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "jina-v1-en",
            "jina-v2-code",
            "roberta-bpe",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ),
        _GPT2_RULE,
    ),
    "gpt2": _GPT2_RULE,  # not llama.cpp's spelling (it writes gpt-2); kept for older files
    "jais-2": _rule(_JAIS2),
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m", "sarvam-moe"), _SPM_LINES),
    **dict.fromkeys(
        ("refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"),
        _DIGITS_RULE,
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"),
        _QWEN2_RULE,
    ),
    "solar-open": _QWEN2_RULE,
    "qwen35": _rule(_QWEN35),
    "dbrx": _rule(_LLAMA3),
    "smaug-bpe": _rule(_LLAMA3),
    "poro-chat": _rule(*_PORO),
    "bloom": _rule(*_PORO),
    "gpt3-finnish": _rule(*_PORO),
    "chatglm-bpe": _rule(_LLAMA3),
    "glm4": _rule(_LLAMA3, ignore_merges=True),
    "glm5": _rule(_LLAMA3, ignore_merges=True),
    "viking": _rule(*_PORO, r"\p{N}"),
    "tekken": _rule(_TEKKEN, ignore_merges=True, add_bos=True),
    "chameleon": _rule(*_CHAMELEON, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_RULE),
    "granite-embed-multi-97m": _rule(_GRANITE_EMB_MULTI, ignore_merges=True),
    **dict.fromkeys(("tiny_aya", "cohere2moe"), _rule(*_TINY_AYA)),
    "kimi-k2": _rule(_KIMI_K2),
    "superbpe": _rule(*_SUPERBPE),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), _rule(_BAILINGMOE)),
    "seed-coder": _rule(_SEED_CODER),
    "ufakzeka": _rule(_UFAKZEKA),
    "grok-2": _QWEN2_RULE,
    "afmoe": _rule(*_AFMOE),
    "laguna": _rule(_LINES, _QWEN2),
    "exaone-moe": _rule(_EXAONE_MOE),
}
# llama.cpp knows these but splits with rules no regex reproduces (an embedding model's
# lower-casing whitespace split): refused by name rather than tokenized differently.
_UNSUPPORTED = {"whitespace": "jina's whitespace pre-tokenizer (an embedding model)"}


def pre_tokenizer(name: str | None, path: Any = "") -> PreTokenizer:
    """The split rule for ``tokenizer.ggml.pre`` ``name`` (``None``/empty: llama.cpp's
    ``default``). An unknown name logs a warning and uses GPT-2's rule."""
    if not name:
        return PRE_TOKENIZERS["default"]
    if name in _UNSUPPORTED:
        raise ModelLoadError(
            f"{path}: pre-tokenizer {name!r} ({_UNSUPPORTED[name]}) is not supported"
        )
    rule = PRE_TOKENIZERS.get(name)
    if rule is None:
        logger.warning("%s: pre-tokenizer %r is not known; using GPT-2's", path, name)
        return _GPT2_RULE
    return rule


def gguf_tokenizer_wrapper(gguf: GGUFFile) -> Any:
    """The file's tokenizer as mlx-lm wraps one (``TokenizerWrapper``), with its end-of-turn
    ids: what a chat-template format needs."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    tokenizer = gguf_tokenizer(gguf)
    return TokenizerWrapper(tokenizer, eos_token_ids=eos_ids(gguf, tokenizer))


def gguf_tokenizer(gguf: GGUFFile) -> Any:
    """A Hugging Face fast tokenizer (``PreTrainedTokenizerFast``) built from the file's
    ``tokenizer.ggml.*`` metadata and ``tokenizer.chat_template``."""
    from transformers import PreTrainedTokenizerFast

    meta = gguf.metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError(f"{gguf.path} has no tokenizer.ggml.tokens")
    if kind in ("gpt2", "gemma4"):  # gemma4: BPE over SentencePiece-style pieces
        pre = "gemma4" if kind == "gemma4" else meta.get("tokenizer.ggml.pre")
        rule = pre_tokenizer(pre, gguf.path)
        backend = _bpe_tokenizer(gguf, tokens, rule)
        add_bos_default = rule.add_bos
    elif kind == "llama":
        backend = _spm_tokenizer(gguf, tokens)
        add_bos_default = True
    else:
        raise ModelLoadError(
            f"{gguf.path}: tokenizer model {kind!r} is not supported (gpt2, gemma4, llama)"
        )

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = special("bos")
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", add_bos_default):
        from tokenizers import processors

        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, int(meta["tokenizer.ggml.bos_token_id"]))],
        )
    template = meta.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        chat_template=template if isinstance(template, str) else None,
        clean_up_tokenization_spaces=False,
    )


def _special_tokens(gguf: GGUFFile, tokens: list[str]) -> list[Any]:
    from tokenizers import AddedToken

    types = gguf.metadata.get("tokenizer.ggml.token_type")
    if types is None:
        return []
    # 3: control (special), 4: user defined (added, not special).
    return [
        AddedToken(tokens[i], special=int(t) == 3, normalized=False)
        for i, t in enumerate(types)
        if int(t) in (3, 4)
    ]


def _bpe_tokenizer(gguf: GGUFFile, tokens: list[str], rule: PreTokenizer) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in gguf.metadata.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    steps = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in rule.regexes]
    if rule.byte_level:
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=rule.ignore_merges))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.decoder = decoders.ByteLevel()
    else:  # SentencePiece-style BPE: spaces as "▁", raw UTF-8 pieces, bytes as <0xXX>
        tok = Tokenizer(
            models.BPE(vocab, merges, ignore_merges=rule.ignore_merges, byte_fallback=True)
        )
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.add_tokens(_special_tokens(gguf, tokens))
    return tok


def _spm_tokenizer(gguf: GGUFFile, tokens: list[str]) -> Any:
    """SentencePiece BPE (llama, gemma, phi3): merges rebuilt from the pieces' scores, as
    Hugging Face's own converter does."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = gguf.metadata.get("tokenizer.ggml.scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    score = (lambda i: float(scores[i])) if scores is not None else (lambda i: -float(i))
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((score(i), vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    unk = gguf.metadata.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(
        models.BPE(
            vocab,
            [(m[3], m[4]) for m in merges],
            unk_token=tokens[int(unk)] if unk is not None else None,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    steps = [normalizers.Replace(" ", "▁")]
    if gguf.metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *(
                [decoders.Strip(" ", 1, 0)]
                if gguf.metadata.get("tokenizer.ggml.add_space_prefix", True)
                else []
            ),
        ]
    )
    tok.add_tokens(_special_tokens(gguf, tokens))
    return tok


def eos_ids(gguf: GGUFFile, tokenizer: Any) -> list[int]:
    """The end-of-turn ids: the file's eos, plus the chat template's turn end if named."""
    ids = []
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        ids.append(int(eos))
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in gguf.metadata:
            ids.append(int(gguf.metadata[key]))
    vocab = tokenizer.get_vocab()
    for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        template = gguf.metadata.get("tokenizer.chat_template") or ""
        if name in vocab and name in template:
            ids.append(vocab[name])
    return sorted(set(ids))
