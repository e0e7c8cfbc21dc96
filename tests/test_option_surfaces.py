"""One sampling schema on every surface: each field, within its limits, reaches the CLI,
the prompt config, the chat's \\set, the server and the C++ options."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import _core
from mlx_harmony_core.chat import ChatSession
from mlx_harmony_core.chat_log import ChatLog
from mlx_harmony_core.cli import build_parser
from mlx_harmony_core.cli.common import sampling_from
from mlx_harmony_core.params import FIELDS, SamplingParams, constraints, describe
from mlx_harmony_core.server import ChatRequest, api_limits, parse_body

PACKAGE = Path(mhc.__file__).parent
# Fields the C++ struct takes as arrays, not as SamplingOptions members.
ARRAY_FIELDS = {"logit_bias", "repetition_context_size"}


def _cases(limits, kind):
    """(value, valid) at each bound and just past it."""
    out = []
    eps = (lambda v: 1) if kind is int else (lambda v: max(abs(v), 1.0) * 1e-6)
    if "ge" in limits:
        out += [(limits["ge"], True), (limits["ge"] - eps(limits["ge"]), False)]
    if "gt" in limits:
        out += [(limits["gt"], False), (limits["gt"] + eps(limits["gt"]), True)]
    if "le" in limits:
        out += [(limits["le"], True), (limits["le"] + eps(limits["le"]), False)]
    if "lt" in limits:
        out += [(limits["lt"], False), (limits["lt"] - eps(limits["lt"]), True)]
    return [(kind(v) if kind is int else float(v), ok) for v, ok in out]


def _kind(name):
    return int if SamplingParams.model_fields[name].annotation in (int, int | None) else float


def _cli(command, name, value):
    args = build_parser().parse_args([command, "--" + name.replace("_", "-") + "=" + str(value)])
    sampling_from(args)


def _config(name, value):
    mhc.PromptConfig(**{name: value})


def _chat(name, value):
    engine = SimpleNamespace(context_length=None, prefill_step_size=512)
    session = ChatSession(
        engine=engine, model_name="x", prompt_config=mhc.PromptConfig(), log=ChatLog()
    )
    session.set(f"{name}={json.dumps(value)}")


def _server(name, value):
    req = parse_body(
        ChatRequest,
        json.dumps({"messages": [{"role": "user", "content": "x"}], name: value}).encode(),
    )
    req.params()


SURFACES = {
    "generate": lambda n, v: _cli("generate", n, v),
    "chat-flags": lambda n, v: _cli("chat", n, v),
    "bench": lambda n, v: _cli("bench", n, v),
    "prompt-config": _config,
    "chat-set": _chat,
}


@pytest.mark.parametrize("name", [n for n in FIELDS if n != "logit_bias"])
def test_every_surface_takes_each_field_within_its_limits(name):
    kind = _kind(name)
    cases = _cases(constraints(name), kind)
    assert cases, f"{name} has no limits"
    for surface, call in SURFACES.items():
        for value, ok in cases:
            if ok:
                call(name, value)
                continue
            with pytest.raises(ValueError) as info:
                call(name, value)
            assert describe(name) in str(info.value), (surface, value, str(info.value))
    # The server: OpenAI's limits where OpenAI defines them, the same wording.
    from mlx_harmony_core.server import APIError

    for value, ok in _cases(
        {k: v for k, v in api_limits(name).items() if k != "allow_inf_nan"}, kind
    ):
        if ok:
            _server(name, value)
            continue
        with pytest.raises(APIError) as info:
            _server(name, value)
        assert describe(name, api_limits(name)) in info.value.message, (value, info.value.message)


def test_every_field_reaches_every_surface():
    dests = {
        a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
    }
    bench = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions}
    options = _core.SamplingOptions()
    for name in FIELDS:
        assert name in dests and name in bench, name
        assert name in mhc.PromptConfig.model_fields, name
        assert name in ChatRequest.model_fields, name
        assert name in ARRAY_FIELDS or hasattr(options, name), name


def test_logit_bias_limits_on_every_surface():
    for bad in ({2**31: 1.0}, {5: 101.0}, {-1: 1.0}):
        with pytest.raises(ValueError, match="logit_bias must map"):
            mhc.PromptConfig(logit_bias=bad)
    with pytest.raises(ValueError, match="--logit-bias must map"):
        _cli("generate", "logit_bias", "2147483648:1")
    from mlx_harmony_core.server import APIError

    with pytest.raises(APIError, match="logit_bias must map"):
        _server("logit_bias", {"2147483648": 1})


def test_options_come_from_params_by_name():
    from mlx_harmony_core.sampling import options

    p = SamplingParams(temperature=0.3, top_k=7, top_p=0.5, min_p=0.2, xtc_probability=0.4)
    o = options(p, seed=11)
    for name in FIELDS:
        if hasattr(o, name) and name != "seed":
            assert math.isclose(getattr(o, name), getattr(p, name), rel_tol=1e-6), name
    assert o.seed == 11
