"""Command line: mlx-harmony-core generate | chat | serve | make-test-model | fetch-test-model |
convert | bench | info."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import bench, chat, convert, generate, info, make_test_model, serve
from .common import release_group

# In --help order; each module adds its subcommand(s).
SUBCOMMANDS = (generate, chat, serve, make_test_model, convert, bench, info)


def build_parser() -> argparse.ArgumentParser:
    """The ``mlx-harmony-core`` parser, every subcommand on it."""
    parser = argparse.ArgumentParser(prog="mlx-harmony-core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common = argparse.ArgumentParser(add_help=False)  # -v after the command works too
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars (they show only when stderr is a terminal)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mlx-harmony-core`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    from ..errors import GroupError
    from ..progress import set_quiet

    set_quiet(args.quiet)

    args.group = None
    if getattr(args, "distributed", False):
        from ..distributed import init

        try:
            args.group = init(timeout_s=getattr(args, "group_timeout", None))
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, TypeError, FileExistsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GroupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        release_group(args.group)


__all__ = ["build_parser", "main"]
