"""``python -m aioforward demo`` and ``python -m aioforward bench``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

# Absolute imports: anyio.to_process workers (which the bench measures) run this file by path
# as their __main__, where a relative import fails.
from aioforward.bench._cli import Options, configure_parser

if TYPE_CHECKING:
    from collections.abc import Sequence


def _rounds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1 (forward passes per mode, after one warm-up), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m aioforward`` command line, with its ``demo`` and ``bench`` commands.

    Example: ``build_parser().parse_args(["demo", "--rounds", "3"]).rounds == 3``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m aioforward",
        description="aioforward's command line: a demo, and the benchmark suite.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")
    demo = sub.add_parser(
        "demo",
        help="two modules: direct calls vs run_parallel, with loop lag",
        description="Run an MLP and a conv net one after the other in a coroutine, then at "
        "once with run_parallel on a ThreadPool and a ProcessPool, and print wall time, "
        "speed-up and event-loop lag. Uses rich when installed ('aioforward[cli]').",
    )
    demo.add_argument(
        "--rounds",
        type=_rounds,
        default=8,
        metavar="N",
        help="forward passes per mode, N >= 1 (default 8)",
    )
    configure_parser(
        sub.add_parser(
            "bench",
            help="measure every pool against the alternatives on this machine "
            "(needs 'aioforward[bench]')",
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m aioforward`` with ``argv`` (``sys.argv[1:]`` when ``None``); return the
    exit status.

    Example: ``main(["demo", "--rounds", "2"])``, or ``main(["bench", "--help"])``.
    """
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from aioforward._demo import run_demo

        return run_demo(rounds=args.rounds)
    from aioforward.bench._cli import run

    return run(Options.from_namespace(args))


if __name__ == "__main__":
    sys.exit(main())
