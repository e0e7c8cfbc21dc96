"""The chat-format seam: a chat template's default system prompt and tools, and an engine
without model-family branches."""

from pathlib import Path

import pytest

import mlx_harmony_core as mhc

PACKAGE = Path(mhc.__file__).parent


# -- chat formats -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template_format():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from support.bpe import trained_tokenizer

    template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDEFAULT PROMPT<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf = trained_tokenizer("hello world system user assistant default prompt", 400, template)
    return mhc.ChatTemplateFormat(TokenizerWrapper(hf))


def _text(fmt, ids):
    return b"".join(fmt.token_bytes()[i] for i in ids).decode()


def test_instructions_replace_the_templates_default_system_prompt(template_format):
    ids = template_format.render(
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    )
    text = _text(template_format, ids)
    assert "DEFAULT PROMPT" not in text and text.startswith("<|im_start|>system\nBe brief.")
    plain = _text(template_format, template_format.render("hello"))
    assert "DEFAULT PROMPT" in plain


def test_tools_a_template_ignores_are_reported(template_format, caplog):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with caplog.at_level("WARNING"):
        template_format.render("hello", tools=[tool])
    assert "no tool support" in caplog.text


def test_engine_has_no_family_branches():
    server = [p.relative_to(PACKAGE) for p in (PACKAGE / "server").glob("*.py")]
    for module in ("engine.py", "request.py", "chat.py", *server):
        text = (PACKAGE / module).read_text()
        for needle in ('"gpt_oss"', "201088", '"analysis"', "encoding is not None"):
            assert needle not in text, (module, needle)
