"""llama.cpp's own tokenizer test set: its vocabulary-only GGUF files (``models/ggml-vocab-*``)
with the ids llama.cpp gives for each test text (``.inp`` / ``.out``), and ``llama-vocab.cpp``
(the pre-tokenizer table), taken from the ``llama-cpp-python`` source release on PyPI (it
vendors llama.cpp), sha256-checked and kept in the real-models cache between runs."""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import pytest

from mlx_harmony_core.models.real_models import cache_dir

VERSION = "0.3.36"
URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{VERSION}.tar.gz"
)
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_PREFIX = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"


def _wanted(name: str) -> bool:
    rest = name[len(_PREFIX) :] if name.startswith(_PREFIX) else ""
    return rest == "src/llama-vocab.cpp" or rest.startswith("models/ggml-vocab-")


def llama_cpp_sources() -> Path:
    """The folder holding ``src/llama-vocab.cpp`` and ``models/ggml-vocab-*`` (downloaded
    on first use; skips the test when offline, fails under CI)."""
    target = cache_dir() / f"llama.cpp-{VERSION}"
    if (target / "src" / "llama-vocab.cpp").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        try:
            urllib.request.urlretrieve(URL, archive)
        except OSError as exc:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"cannot download llama.cpp's test vocabularies: {exc}")
        h = hashlib.sha256(archive.read_bytes()).hexdigest()
        if h != SHA256:
            raise ValueError(f"{URL} has sha256 {h}, expected {SHA256}")
        out = Path(tmp) / "out"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name)]
            for m in members:
                m.name = m.name[len(_PREFIX) :]
            tar.extractall(out, members=members, filter="data")
        if target.exists():  # another run got there first
            return target
        os.replace(out, target)
    return target


def vocab_cases(path: Path) -> list[tuple[str, list[int]]]:
    """The test texts of ``ggml-vocab-X.gguf`` with llama.cpp's ids for each."""
    texts = path.with_name(path.name + ".inp").read_text(encoding="utf-8")
    outs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    cases = texts.split("\n__ggml_vocab_test__\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(cases, outs, strict=False)]
