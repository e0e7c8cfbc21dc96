"""Model loading through mlx-lm, the demo model, and clear errors for bad directories."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.models.builder import PRESETS, demo_model_path


def test_demo_loads_with_real_gpt_oss_shape(demo_engine):
    cfg = demo_engine.config
    assert cfg["model_type"] == "gpt_oss"
    assert cfg["vocab_size"] == 201088
    assert cfg["sliding_window"] == 128
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert demo_engine.encoding is not None


def test_demo_is_built_once_and_seeded(tmp_path):
    path = demo_model_path()
    mtime = os.path.getmtime(path / "model.safetensors")
    assert demo_model_path() == path
    assert os.path.getmtime(path / "model.safetensors") == mtime
    again = mhc.make_test_model(tmp_path / "again", preset="demo", seed=0)
    a = mx.load(str(path / "model.safetensors"))
    b = mx.load(str(again / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_logits_equal_mlx_lm_loader():
    from mlx_lm.utils import load_model as mlx_lm_load_model

    path = demo_model_path()
    ours, _, _ = mhc.load_model(path)
    theirs, _ = mlx_lm_load_model(path)
    tokens = mx.array([[200006, 1428, 200008, 13225, 1354, 0, 11, 3862, 200007]])
    # Bit-equal on MLX's ops; the fused CPU primitives are within rounding (test_fused_model).
    from mlx_harmony_core.cpu.fused import fused

    with fused(False):
        np.testing.assert_array_equal(np.array(ours(tokens)), np.array(theirs(tokens)))


def test_make_test_model_shapes_and_files(tmp_path):
    out = mhc.make_test_model(
        tmp_path / "m",
        layers=4,
        hidden_size=32,
        heads=2,
        kv_heads=1,
        head_dim=8,
        experts=3,
        experts_per_token=1,
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    assert cfg["num_local_experts"] == 3
    engine = mhc.load(out)
    logits = engine.model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 201088)
    assert (out / "config.json").stat().st_mode & 0o044  # readable like a normal file


def test_make_test_model_refuses_to_clobber(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        mhc.make_test_model(target, preset="demo")
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": 1}, "at least 2 layers"),
        ({"heads": 3, "kv_heads": 2}, "multiple"),
        ({"experts": 2, "experts_per_token": 4}, "exceeds"),
        ({"hidden_size": 0}, "positive"),
        ({"preset": "huge"}, "unknown preset"),
    ],
)
def test_make_test_model_validates(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mhc.make_test_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()


def test_presets_cover_tiny_and_mid():
    assert set(PRESETS) >= {"demo", "small", "mid"}


def test_missing_directory(tmp_path):
    with pytest.raises(mhc.ModelLoadError, match="does not exist"):
        mhc.load(tmp_path / "nope")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(mhc.ModelLoadError, match="is a file"):
        mhc.load(f)


def test_directory_without_config(tmp_path):
    with pytest.raises(mhc.ModelLoadError, match="no config.json"):
        mhc.load(tmp_path)


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_oss",')
    with pytest.raises(mhc.ModelLoadError, match="not valid JSON"):
        mhc.load(tmp_path)


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(mhc.ModelLoadError, match="model_type"):
        mhc.load(tmp_path)


def test_unknown_model_type(tmp_path):
    src = demo_model_path()
    (tmp_path / "config.json").write_text(
        json.dumps({**json.loads((src / "config.json").read_text()), "model_type": "no_such_arch"})
    )
    os.symlink(src / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(mhc.ModelLoadError, match="no_such_arch"):
        mhc.load(tmp_path)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text((demo_model_path() / "config.json").read_text())
    with pytest.raises(mhc.ModelLoadError, match="safetensors"):
        mhc.load(tmp_path)


def test_wrong_weights_for_config(tmp_path):
    cfg = json.loads((demo_model_path() / "config.json").read_text())
    cfg["hidden_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    os.symlink(demo_model_path() / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(mhc.ModelLoadError, match="cannot load"):
        mhc.load(tmp_path)


def test_offline_repo_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mhc.ModelLoadError, match="not a local directory"):
        mhc.load("no-such-org/no-such-model-xyz")
