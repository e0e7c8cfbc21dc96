"""``mlx-harmony-core make-test-model``: a random-weight GPT-OSS model directory."""

from __future__ import annotations

import argparse
from typing import Any

from .common import positive


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``make-test-model`` subcommand."""
    from ..models.builder import PRESETS, QUANTIZATIONS

    t = sub.add_parser(
        "make-test-model", parents=parents, help="write a random-weight GPT-OSS model directory"
    )
    t.add_argument("dir", help="directory to write (must be empty, or use --force)")
    t.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="demo",
        help="demo: tiny; small: ~0.24B; mid: ~0.84B parameters (float32); gpt-oss-20b: "
        "the released 20b's shapes (21B: use --quantize mxfp4-q8, ~13 GB)",
    )
    for flag, what in (
        ("--layers", "transformer layers (>= 2)"),
        ("--hidden-size", "hidden size"),
        ("--intermediate-size", "expert MLP width"),
        ("--heads", "attention heads"),
        ("--kv-heads", "key/value heads (divides --heads)"),
        ("--head-dim", "width of one attention head"),
        ("--experts", "experts per MoE layer"),
        ("--experts-per-token", "experts each token uses"),
    ):
        t.add_argument(flag, type=positive, help=what + " (overrides the preset)")
    t.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same model)")
    t.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        help="write quantized weights: 4 / 8 = affine everywhere, mxfp4 = MXFP4 experts "
        "(the rest float, as the released checkpoints), mxfp4-q8 = MXFP4 experts and "
        "8-bit elsewhere (as mlx-community's conversions)",
    )
    t.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        help="affine quantization group size (default 64)",
    )
    t.add_argument("--force", action="store_true", help="replace an existing directory")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the model directory."""
    from ..models.builder import make_test_model

    shape = {
        "layers": args.layers,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "experts": args.experts,
        "experts_per_token": args.experts_per_token,
    }
    path = make_test_model(
        args.dir,
        preset=args.preset,
        seed=args.seed,
        overwrite=args.force,
        quantize=args.quantize,
        group_size=args.group_size,
        **shape,
    )
    how = f", quantized {args.quantize}" if args.quantize else ""
    print(f"wrote a random-weight GPT-OSS model{how} to {path}")
    return 0
