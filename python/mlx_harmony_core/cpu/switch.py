"""One on/off switch for layers that loading swaps to our CPU primitives.

Each family of switched layers (quantized kernels, fused primitives) has an environment
variable that keeps loading from swapping them in (``=mlx``) and a scope that runs the swapped
layers on MLX's own ops for a while (a benchmark comparing both paths on one model object).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlx.core as mx

__all__ = ["Switch"]


class Switch:
    """The load-time and call-time switch of one family of swapped layers."""

    def __init__(self, env: str) -> None:
        self.env = env
        self.active = True  # swapped layers consult it at call time

    def enabled(self) -> bool:
        """Whether loading swaps layers in: on a CPU device, unless ``<env>=mlx``."""
        return os.environ.get(self.env, "").lower() != "mlx" and mx.default_device() == mx.cpu

    @contextlib.contextmanager
    def scope(self, enabled: bool) -> Iterator[None]:
        """Run swapped layers on our primitives (True) or MLX's ops (False) in the block."""
        before, self.active = self.active, enabled
        try:
            yield
        finally:
            self.active = before
