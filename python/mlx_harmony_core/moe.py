"""Moved to :mod:`mlx_harmony_core.cpu.experts`; this alias of it is kept for one release."""

import sys

from .cpu import experts as _moved

sys.modules[__name__] = _moved
