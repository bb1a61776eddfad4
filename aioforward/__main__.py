"""``python -m aioforward demo`` and ``python -m aioforward bench``."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aioforward")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="two modules: direct calls vs run_parallel, with loop lag")
    demo.add_argument("--rounds", type=int, default=8, help="forward passes per mode (default 8)")
    sub.add_parser(
        "bench", help="the benchmark suite (benchmarks/run.py of a source checkout)", add_help=False
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        return run_demo(rounds=args.rounds)
    script = _find_bench()
    if script is None:
        print(
            "python -m aioforward bench runs benchmarks/run.py from a source checkout of "
            "aioforward; run it from the repository's root",
            file=sys.stderr,
        )
        return 2
    # Import it as a module (benchmarks.run), not as __main__: spawned workers of the
    # alternatives it measures must find its functions by name.
    sys.path.insert(0, str(script.parent.parent))
    bench = importlib.import_module("benchmarks.run")
    return int(bench.main(rest))


def _find_bench() -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = root / "benchmarks" / "run.py"
        if candidate.is_file():
            return candidate
    return None


if __name__ == "__main__":
    sys.exit(main())
