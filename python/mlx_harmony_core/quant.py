"""Moved to :mod:`mlx_harmony_core.cpu.quant`; this alias of it is kept for one release."""

import sys

from .cpu import quant as _moved

sys.modules[__name__] = _moved
