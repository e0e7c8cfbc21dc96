"""The o200k vocabulary that openai_harmony needs, shipped so nothing is downloaded.

openai_harmony reads ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` when that variable is
set and downloads the file otherwise. We unpack our gzipped copy once into :func:`home`,
check its sha256, and point the variable there unless the user set it.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
from importlib import resources
from pathlib import Path

from ._paths import atomic_write_bytes, home

logger = logging.getLogger(__name__)

VOCAB_NAME = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def packaged_vocab_bytes() -> bytes:
    """The shipped vocabulary, decompressed and checked against its sha256."""
    blob = resources.files(__package__).joinpath("data", VOCAB_NAME + ".gz").read_bytes()
    data = gzip.decompress(blob)
    if _sha256(data) != VOCAB_SHA256:
        raise RuntimeError(
            f"the {VOCAB_NAME} shipped with mlx-harmony-core is corrupted "
            "(sha256 mismatch); reinstall the package"
        )
    return data


def _valid(path: Path) -> bool:
    try:
        return _sha256(path.read_bytes()) == VOCAB_SHA256
    except OSError:
        return False


def _candidate_dirs() -> list[Path]:
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [home() / "vocab", Path(tempfile.gettempdir()) / f"mlx-harmony-core-{user}" / "vocab"]


def vocab_dir() -> Path:
    """A directory holding a verified ``o200k_base.tiktoken``, unpacking it if needed."""
    for base in _candidate_dirs():
        target = base / VOCAB_NAME
        if _valid(target):
            return base
        try:
            atomic_write_bytes(target, packaged_vocab_bytes())
            return base
        except OSError as exc:  # read-only home: fall back to the temp dir
            logger.warning("cannot write the vocabulary to %s (%s); trying elsewhere", base, exc)
    raise OSError(
        "could not unpack the o200k vocabulary anywhere writable; set "
        "MLX_HARMONY_CORE_HOME to a writable directory"
    )


def ensure_vocab_env() -> str:
    """Point ``TIKTOKEN_ENCODINGS_BASE`` at the shipped vocabulary unless the user set it."""
    current = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if current:
        return current
    path = str(vocab_dir())
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = path
    return path
