"""The redesign: one sampling schema on every surface, the token mask and logits-processor
hooks, the chat-format seam, typed errors, and an import graph without cycles or writes."""

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import _core
from mlx_harmony_core.chat import ChatSession
from mlx_harmony_core.chat_log import ChatLog
from mlx_harmony_core.cli import build_parser
from mlx_harmony_core.cli.common import sampling_from
from mlx_harmony_core.params import FIELDS, SamplingParams, constraints, describe
from mlx_harmony_core.sampling import pack_mask
from mlx_harmony_core.server import ChatRequest, api_limits, parse_body
from reference import process, reference_probs
from stats import assert_distribution

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


# -- token mask ---------------------------------------------------------------------------------
def test_pack_mask_layout():
    allowed = np.random.default_rng(0).random((3, 70)) < 0.5
    packed = pack_mask(allowed)
    assert packed.shape == (3, 3) and packed.dtype == np.uint32
    bits = (packed[:, np.arange(70) // 32] >> (np.arange(70) % 32).astype(np.uint32)) & 1
    assert (bits.astype(bool) == allowed).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "mlx-ops"])
@pytest.mark.parametrize(
    "controls",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=3),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=1.0, min_p=0.1, logit_bias={0: 5.0, 3: 2.0}),
        dict(temperature=0.9, xtc_probability=0.5, xtc_threshold=0.05),
        dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5),
    ],
)
def test_random_masks_against_the_reference(kernel, controls):
    rng = np.random.default_rng(hash(str(controls)) % 2**32)
    vocab = 40
    for _ in range(3):
        logits = rng.normal(scale=2.0, size=vocab).astype(np.float32)
        allowed = rng.random(vocab) < 0.4
        allowed[rng.integers(vocab)] = True
        history = [1, 2, 2, 5] if "repetition_penalty" in controls else None
        p = {k: v for k, v in controls.items()}
        expected_x = process(
            logits,
            bias=p.get("logit_bias"),
            history=history,
            **{k: v for k, v in p.items() if k in ("repetition_penalty", "presence_penalty")},
        )
        expected_x[~allowed] = -np.inf
        keys = ("temperature", "top_k", "top_p", "min_p", "xtc_probability", "xtc_threshold")
        expected = reference_probs(expected_x, **{k: v for k, v in p.items() if k in keys})
        rows = 20000
        x = mx.broadcast_to(mx.array(logits), (rows, vocab))
        mask = np.broadcast_to(pack_mask(allowed), (rows, 2))
        sampler = mhc.Sampler(SamplingParams(seed=3, **controls), kernel=kernel)
        ids = np.array(sampler(x, history, mask=mask))
        assert allowed[ids].all(), "a masked token was drawn"
        assert_distribution(ids, expected)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "mlx-ops"])
def test_mask_bad_inputs_and_all_masked(kernel):
    s = mhc.Sampler(SamplingParams(temperature=1.0, seed=1), kernel=kernel)
    x = mx.zeros((2, 40))
    with pytest.raises(ValueError, match="token mask must have shape"):
        s(x, mask=np.zeros((2, 1), np.uint32))
    with pytest.raises(ValueError, match="masked"):
        s(x, mask=np.zeros((2, 2), np.uint32))


def test_engine_token_mask_is_never_violated(demo_engine):
    allowed = np.zeros(demo_engine.vocab_size, bool)
    allowed[[1000, 2000, 3000]] = True
    seen = []

    def mask(generated):
        seen.append(len(generated))
        return pack_mask(allowed)

    c = demo_engine.generate(
        [1, 2, 3],
        SamplingParams(temperature=1.0, seed=0),
        max_tokens=12,
        token_mask=mask,
        ignore_eos=True,
    )
    assert set(c.tokens) <= {1000, 2000, 3000} and seen == list(range(12))


# -- logits processors --------------------------------------------------------------------------
def test_logits_processors_match_mlx_lm(demo_engine):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    prompt = mx.array(demo_engine.render("Say something"))

    def make():
        return make_logits_processors({5: 3.0}, repetition_penalty=1.4, repetition_context_size=16)

    theirs = []
    for tok, _ in generate_step(
        prompt,
        demo_engine.model,
        max_tokens=24,
        logits_processors=make(),
        sampler=lambda x: mx.argmax(x, -1),
    ):
        theirs.append(int(tok))
    demo_engine.reset_cache()
    ours = demo_engine.generate(
        prompt.tolist(),
        SamplingParams(temperature=0.0),
        max_tokens=24,
        ignore_eos=True,
        logits_processors=make(),
    ).tokens
    assert ours == theirs


# -- chat formats -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template_format():
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from bpe import trained_tokenizer

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


# -- errors -------------------------------------------------------------------------------------
def test_errors_by_type(encoding):
    from mlx_harmony_core.testing import ScriptedModel

    engine = mhc.Engine(ScriptedModel([], 0), encoding=encoding, context_length=10)
    with pytest.raises(mhc.ContextLengthError):
        engine.generate("a long prompt " * 20)
    with pytest.raises(mhc.InvalidRequestError):
        engine.generate([{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'.*SamplingParams"):
        engine.generate("x", temprature=0.5)
    assert issubclass(mhc.ModelLoadError, ValueError)


# -- imports ------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    """``server/app.py`` -> ``server.app``; ``server/__init__.py`` -> ``server``."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """The package's modules by dotted name (sub-packages' too), the package itself left out."""
    paths = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    return {_module_name(p): p for p in paths if p != PACKAGE / "__init__.py"}


def _relative_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (functions too), by dotted name
    (``from .x import y`` counts ``x`` and ``x.y``), outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    here = _module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # the package the module is in
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 1 and id(node) not in skip:
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                out.add(".".join(target))
            out |= {".".join([*target, a.name]) for a in node.names}
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {
        m: {d for d in _relative_imports(p) if d in modules and d != m} for m, p in modules.items()
    }
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, m, d]))
            if d not in state:
                visit(d, [*trail, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_each_module_imports_alone(tmp_path):
    names = sorted(m for m in _modules() if not m.endswith("__main__"))  # those run
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module('mlx_harmony_core.' + n)\n"
    for name in names:  # each in a fresh interpreter: no order can hide a cycle
        r = subprocess.run(
            [sys.executable, "-c", code, name], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, (name, r.stderr[-2000:])


def test_import_writes_no_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_ENCODINGS_BASE"}
    env["MLX_HARMONY_CORE_HOME"] = str(tmp_path / "home")
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    code = "import mlx_harmony_core as m; print(m.__version__)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    from importlib.metadata import version

    assert r.stdout.strip() == version("mlx-harmony-core") == mhc.__version__
    assert not (tmp_path / "home").exists() and not any((tmp_path / "tmp").iterdir())
    code = "import mlx_harmony_core as m; print(len(m.load_encoding().encode('hi')))"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and (tmp_path / "home" / "vocab").exists()  # unpacked on first use
