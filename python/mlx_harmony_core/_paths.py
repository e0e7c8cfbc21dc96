"""Where mlx-harmony-core keeps its files, and how it writes them safely."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def home() -> Path:
    """Directory for the unpacked vocabulary and the demo model.

    ``MLX_HARMONY_CORE_HOME`` wins; otherwise ``$XDG_CACHE_HOME/mlx-harmony-core``
    (default ``~/.cache/mlx-harmony-core``).
    """
    env = os.environ.get("MLX_HARMONY_CORE_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mlx-harmony-core"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def public_mode(path: Path, *, directory: bool = False) -> None:
    """Give a temp file or directory the permissions a normal create would (mkstemp uses 0600)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        public_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
