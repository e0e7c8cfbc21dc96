import os
import tempfile

os.environ.setdefault("MLX_HARMONY_CORE_HOME", tempfile.mkdtemp(prefix="mhc-bench-home-"))

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu():
    mx.set_default_device(mx.cpu)
    yield
