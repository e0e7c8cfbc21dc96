"""Moved to :mod:`mlx_harmony_core.models.gguf`; this alias of it is kept for one release."""

import sys

from .models import gguf as _moved

sys.modules[__name__] = _moved
