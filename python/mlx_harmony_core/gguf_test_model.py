"""Moved to :mod:`mlx_harmony_core.models.gguf_builder`; this alias of it is kept for one release."""

import sys

from .models import gguf_builder as _moved

sys.modules[__name__] = _moved
