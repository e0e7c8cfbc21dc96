"""The package version, read once from the installed metadata (pyproject.toml is the source)."""

from importlib import metadata

try:
    __version__ = metadata.version("mlx-harmony-core")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"
