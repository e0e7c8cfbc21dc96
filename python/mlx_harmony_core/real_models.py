"""Moved to :mod:`mlx_harmony_core.models.real_models`; this alias of it is kept for one release."""

import sys

from .models import real_models as _moved

sys.modules[__name__] = _moved
