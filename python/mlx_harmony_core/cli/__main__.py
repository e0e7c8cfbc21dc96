"""``python -m mlx_harmony_core.cli``."""

import sys

from . import main

sys.exit(main())
