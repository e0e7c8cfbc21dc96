"""LoRA adapters in mlx-lm's format: ``mhc.load(..., adapter_path=...)`` and ``--adapter-path``
give exactly mlx-lm's ``load(..., adapter_path=...)`` logits (demo model directory)."""

import json

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.cpu.layers import EXPERTS_ENV
from mlx_harmony_core.errors import ModelLoadError
from mlx_harmony_core.models.builder import demo_model_path
from mlx_harmony_core.testing import write_adapters


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Random LoRA weights for the demo model, written as mlx-lm writes them."""
    return write_adapters(tmp_path_factory.mktemp("adapters"), seed=3)


def test_logits_equal_mlx_lm_with_the_same_adapters(adapters, monkeypatch):
    from mlx_lm import load as lm_load

    from mlx_harmony_core.cpu.fused import fused

    monkeypatch.setenv(EXPERTS_ENV, "mlx")  # MLX's own expert path, as mlx-lm runs it
    path = demo_model_path()
    ref, _ = lm_load(str(path), adapter_path=str(adapters))
    ours = mhc.load(path, adapter_path=adapters)
    plain = mhc.load(path)
    ids = mx.array([ours.render([{"role": "user", "content": "Hello there"}])])
    # MLX's own ops on both sides: the loaded weights and adapters are what must be equal
    # (our fused CPU primitives are within float32 rounding of MLX's ops, not bit-equal).
    with fused(False):
        want, got = ref(ids), ours.model(ids)
    assert mx.array_equal(want, got).item()
    assert not mx.allclose(plain.model(ids), got).item()  # the adapters change the model


def test_bad_adapter_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        mhc.load(demo_model_path(), adapter_path=tmp_path)


def test_cli_flag(adapters, capsys):
    from mlx_harmony_core.cli import build_parser, main

    args = build_parser().parse_args(["generate", "--adapter-path", str(adapters)])
    assert args.adapter_path == str(adapters)
    argv = ["generate", "--model", str(demo_model_path()), "--adapter-path", str(adapters)]
    assert main([*argv, "--max-tokens", "2", "--prompt", "hi", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["usage"]["completion_tokens"] == 2
