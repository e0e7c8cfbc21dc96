"""``mlx-harmony-core info``: MLX version, device and BLAS."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The ``info`` subcommand."""
    i = sub.add_parser(
        "info", parents=parents, help="MLX version, device and the BLAS MLX's CPU calls reach"
    )
    i.add_argument(
        "--distributed", action="store_true", help="under mlx.launch: also show the group"
    )
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the backend's facts (each rank, under --distributed)."""
    import mlx_harmony_core as mhc

    if args.group is not None:  # every rank prints its own line; nothing to follow
        args.group.barrier()
        args.group.released = True
    for key, value in mhc.backend_info().items():
        print(f"{key}: {value}")
    return 0
