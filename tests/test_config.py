"""Prompt configs, profiles, placeholders and the precedence of settings."""

import datetime
import json

import pytest

from mlx_harmony_core.config import (
    PromptConfig,
    fill_placeholders,
    load_profile,
    load_prompt_config,
    placeholder_values,
    resolve_settings,
)

NOW = datetime.datetime(2026, 11, 25, 9, 30, tzinfo=datetime.UTC)


def test_every_field_of_a_file_is_loaded(tmp_path):
    data = {
        "model_identity": "You are Tester.",
        "reasoning_effort": "high",
        "knowledge_cutoff": "2024-06",
        "conversation_start_date": "<|DATE|>",
        "instructions": "Help {user}.",
        "examples": [{"user": "2+2?", "assistant": "4"}],
        "user_name": "ada",
        "max_tokens": 77,
        "context_length": 4096,
        "truncate": True,
        "show_reasoning": False,
        "temperature": 0.3,
        "top_k": 40,
        "top_p": 0.9,
        "min_p": 0.05,
        "min_tokens_to_keep": 2,
        "xtc_probability": 0.5,
        "xtc_threshold": 0.2,
        "repetition_penalty": 1.1,
        "repetition_context_size": 32,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "logit_bias": {"13": -5.0},
        "seed": 7,
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    config = load_prompt_config(path)
    # nothing silently dropped: every field the file names comes back
    assert set(config.model_dump(exclude_none=True)) == set(data)
    assert config.sampling().top_p == 0.9 and config.sampling().logit_bias == {13: -5.0}
    assert config.render_options(NOW)["conversation_start_date"] == "2026-11-25"
    assert config.prefix_messages(NOW)[0] == {"role": "developer", "content": "Help ada."}


def test_toml_config(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        'instructions = "Be brief."\ntemperature = 0.2\n[[examples]]\nuser="a"\nassistant="b"\n'
    )
    config = load_prompt_config(path)
    assert config.temperature == 0.2 and config.examples[0].assistant == "b"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"tempreature": 0.5}', "did you mean 'temperature'"),
        ('{"temperature": -1}', "temperature"),
        ('{"top_p": 0}', "top_p"),
        ('{"reasoning_effort": "max"}', "reasoning_effort"),
        ('{"examples": [{"user": "x"}]}', "examples.0.assistant"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold an object"),
    ],
)
def test_bad_configs_are_rejected_with_the_file_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad.json") as info:
        load_prompt_config(path)
    assert message in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_config(tmp_path / "nope.json")


def test_precedence_cli_over_chat_over_prompt_config_over_defaults():
    config = PromptConfig(temperature=0.1, top_k=5, max_tokens=10, reasoning_effort="low")
    chat = {"temperature": 0.2, "top_k": 6}
    cli = {"temperature": 0.3, "seed": None}  # an unset flag does not hide lower layers
    s = resolve_settings(prompt_config=config, chat=chat, cli=cli)
    assert s.temperature == 0.3  # CLI
    assert s.top_k == 6  # chat file
    assert s.max_tokens == 10 and s.reasoning_effort == "low"  # prompt config
    assert s.truncate is False and s.sampling().top_p == 1.0  # defaults
    assert resolve_settings().max_tokens == 512


@pytest.mark.parametrize("layer", ["chat", "cli"])
def test_unknown_fields_in_any_layer_are_an_error(layer):
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        resolve_settings(**{layer: {"colour": "red"}})


def test_placeholders_only_replace_known_names():
    values = placeholder_values("bob", NOW)
    text = 'Hi {user}, today is <|DATE|> ({date} {time}); JSON: {"a": {user}} {unknown}'
    assert fill_placeholders(text, values) == (
        'Hi bob, today is 2026-11-25 (2026-11-25 09:30); JSON: {"a": bob} {unknown}'
    )
    assert values["<|DATETIME|>"].startswith("2026-11-25T09:30")


def test_profiles(tmp_path):
    (tmp_path / "helper.json").write_text('{"instructions": "Be kind.", "temperature": 0.4}')
    profiles = {
        "profiles": {
            "kind": {"model": "demo", "prompt_config": "helper.json"},
            "inline": {"model": "/models/x", "prompt_config": {"max_tokens": 9}},
        }
    }
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps(profiles))
    model, config = load_profile("kind", path)
    assert model == "demo" and config.instructions == "Be kind." and config.temperature == 0.4
    assert load_profile("inline", path)[1].max_tokens == 9
    with pytest.raises(ValueError, match="no profile 'x'.*inline, kind"):
        load_profile("x", path)
    path.write_text('{"profiles": {"p": {"model": "demo", "extra": 1}}}')
    with pytest.raises(ValueError, match="unknown field 'extra'"):
        load_profile("p", path)
