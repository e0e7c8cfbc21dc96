"""The request-options schema: one place for each option's default and limits."""

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.chat_format import RENDER_OPTIONS
from mlx_harmony_core.config import DEFAULTS
from mlx_harmony_core.errors import InvalidRequestError, RequestTypeError
from mlx_harmony_core.options import (
    GUIDE,
    MAX_TOKENS,
    RENDER,
    SPECULATION,
    TOOLS,
    RequestOptions,
    fields_in,
)
from mlx_harmony_core.speculative import MAX_DRAFT


def test_defaults_come_from_the_schema(demo_engine):
    assert RequestOptions().max_tokens == MAX_TOKENS == DEFAULTS.max_tokens
    req = demo_engine.request("hi")
    assert req.max_tokens == MAX_TOKENS and req.options == RequestOptions()
    assert fields_in(RENDER) == RENDER_OPTIONS
    assert {"response_format", "regex", "grammar", "max_reasoning_tokens"} == fields_in(GUIDE)
    assert {"speculative", "draft_model", "num_draft"} == fields_in(SPECULATION)
    assert {"builtin_tools", "max_tool_calls", "tool_session"} == fields_in(TOOLS)


def test_every_field_has_a_group_and_a_description():
    for name, field in RequestOptions.model_fields.items():
        assert field.description, name
        assert field.json_schema_extra["group"] in ("request", RENDER, GUIDE, SPECULATION, TOOLS)


@pytest.mark.parametrize(
    "options, error, needle",
    [
        ({"max_tokens": 0}, InvalidRequestError, "max_tokens"),
        ({"max_tokens": True}, RequestTypeError, "max_tokens"),
        ({"max_tokens": "5"}, RequestTypeError, "max_tokens"),
        ({"logprobs": -1}, InvalidRequestError, "logprobs"),
        ({"num_draft": MAX_DRAFT + 1, "speculative": "ngram"}, InvalidRequestError, "num_draft"),
        ({"speculative": "guess"}, InvalidRequestError, "'ngram' or 'draft'"),
        ({"max_reasoning_tokens": -2}, InvalidRequestError, "max_reasoning_tokens"),
        ({"stop": 5}, InvalidRequestError, "stop"),
        ({"truncate": "yes"}, RequestTypeError, "truncate"),
        ({"max_token": 5}, RequestTypeError, "did you mean 'max_tokens'"),
        ({"top_pp": 5}, RequestTypeError, "SamplingParams"),
    ],
)
def test_bad_options_name_the_field(demo_engine, options, error, needle):
    with pytest.raises(error, match=needle) as err:
        demo_engine.request("hi", **options)
    if not needle.startswith("did") and needle != "SamplingParams":
        assert err.value.param == next(iter(options))


def test_an_options_object_and_keywords_combine(demo_engine):
    opts = RequestOptions(max_tokens=3, stop=["x"])
    req = demo_engine.request("hi", None, opts, logprobs=2)
    assert (req.max_tokens, req.logprobs, req.options.stop) == (3, 2, ["x"])
    done = demo_engine.generate("hi", mhc.SamplingParams(temperature=0), options=opts)
    assert done.usage.completion_tokens <= 3
    with pytest.raises(RequestTypeError, match="RequestOptions"):
        demo_engine.request("hi", None, {"max_tokens": 3})
