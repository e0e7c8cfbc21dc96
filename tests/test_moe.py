"""Expert layers run expert by expert on the CPU: the same outputs as MLX's gather path."""

import mlx.core as mx
import pytest
from mlx_lm.models.activations import SwigluOAI
from mlx_lm.models.switch_layers import SwitchGLU

import mlx_harmony_core as mhc
from mlx_harmony_core.cpu.experts import DenseSwitchGLU, _dense_experts, use_dense_experts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (1, 5), (16, 1), (2, 100)])
def test_dense_experts_equal_the_gather_path(bias, shape):
    mx.random.seed(sum(shape) + bias)
    glu = SwitchGLU(48, 40, 6, activation=SwigluOAI(), bias=bias)
    x = mx.random.normal((*shape, 48))
    idx = mx.argpartition(-mx.random.normal((*shape, 6)), 1, axis=-1)[..., :2]
    ref = glu(x, idx)
    got = _dense_experts(glu, x, idx)
    assert got.shape == ref.shape
    assert mx.abs(got - ref).max().item() < 1e-5


def test_switch_picks_the_path_by_pairs_and_keeps_weights():
    glu = SwitchGLU(16, 8, 4, activation=SwigluOAI(), bias=True)
    params = dict(glu.parameters())

    class M:
        def named_modules(self):
            return [("experts", glu)]

    assert use_dense_experts(M()) == 1 and isinstance(glu, DenseSwitchGLU)
    assert use_dense_experts(M()) == 0  # already switched
    assert dict(glu.parameters()).keys() == params.keys()
    x = mx.random.normal((1, 1, 16))
    one = mx.array([[[0, 2]]])  # 2 pairs <= 4 experts: MLX's gather path
    assert glu(x, one).shape == (1, 1, 2, 16)


def test_demo_model_logits_unchanged(demo_engine, monkeypatch):
    """The loaded demo model (switched, and made to take the dense path although its experts
    are tiny) against a fresh load with MLX's path."""
    monkeypatch.setattr("mlx_harmony_core.cpu.experts._MIN_EXPERT_BYTES", 0)
    monkeypatch.setenv("MLX_HARMONY_CORE_EXPERTS", "mlx")
    plain, _, _ = mhc.load_model("demo")
    assert not any(isinstance(m, DenseSwitchGLU) for _, m in plain.named_modules())
    assert any(isinstance(m, DenseSwitchGLU) for _, m in demo_engine.model.named_modules())
    tokens = mx.array([demo_engine.render("Tell me about the sea, at length.")])
    a, b = demo_engine.model(tokens), plain(tokens)
    assert mx.abs(a - b).max().item() < 1e-4
