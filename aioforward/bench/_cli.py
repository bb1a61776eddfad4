"""The ``python -m aioforward bench`` command: options, then the run.

parse options -> check the bench's packages
  -> each selected scenario on a fresh event loop (asyncio or uvloop), figures into a Run
  -> targets, results.json, report.md, report.png in --out
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._measure import Run, Size, Skip
from ._report import NOT_SELECTED, write_report
from ._scenarios import NAMES, SCENARIOS, SMOKE

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._scenarios import Scenario

DESCRIPTION = (
    "Measure every aioforward pool against the alternatives (a direct call, asyncio.to_thread, "
    "ProcessPoolExecutor, anyio.to_process, a process per call, Ray actors) on this machine, in "
    "one run. Writes results.json (every figure), report.md (the targets) and report.png."
)


def _epilog() -> str:
    width = max(len(name) for name in NAMES)
    lines = [f"  {s.name:<{width}}  {s.title}" for s in SCENARIOS]
    return "\n".join(
        [
            "scenarios, in run order (--only picks some):",
            *lines,
            "",
            f"--smoke runs {', '.join(SMOKE)} unless --only says otherwise.",
            "The bench needs the bench extra: pip install 'aioforward[bench]'. Ray rows run when",
            "ray is installed (pip install 'aioforward[ray]'), the CUDA row when a GPU is present.",
            "It measures what a program gets at default settings: nothing in the environment is",
            "tuned for it (set OMP_WAIT_POLICY=PASSIVE yourself to see what that changes).",
        ]
    )


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` the bench's description, options and epilog; return it.

    Example: ``configure_parser(subparsers.add_parser("bench")).parse_args(["--quick"])``.
    """
    parser.description = textwrap.fill(DESCRIPTION, 79)
    parser.epilog = _epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="fewer repeats (a full run takes minutes)"
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="the fewest repeats, and only a few representative scenarios unless --only is "
        "given: checks that the bench works (well under a minute), its figures are rough",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=NAMES,
        metavar="SCENARIO",
        help="run only these scenarios (listed below); the report says which did not run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results"),
        metavar="DIR",
        help="folder for results.json, report.md and report.png, made when missing "
        "(default: ./bench-results)",
    )
    return parser


@dataclass(frozen=True)
class Options:
    """What to measure and where to write it (the parsed command line)."""

    size: Size
    only: tuple[str, ...]  # the scenarios to run, in run order
    out: Path

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> Options:
        """The options of a command line parsed by :func:`configure_parser`'s parser.

        Example: ``Options.from_namespace(parser.parse_args(["--smoke"])).only == SMOKE``.
        """
        size: Size = "smoke" if ns.smoke else "quick" if ns.quick else "full"
        picked = set(ns.only or (SMOKE if size == "smoke" else NAMES))
        return cls(size, tuple(n for n in NAMES if n in picked), ns.out)

    def argv(self) -> list[str]:
        """The options as ``python -m aioforward bench`` arguments, ``--out`` last.

        Example: ``Options("smoke", SMOKE, Path("out")).argv() == ["--smoke", "--out", "out"]``.
        """
        args = [] if self.size == "full" else [f"--{self.size}"]
        if self.only != (SMOKE if self.size == "smoke" else NAMES):
            args += ["--only", *self.only]
        return [*args, "--out", str(self.out)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench with command-line arguments (``sys.argv[1:]`` when ``None``); return the
    exit status.

    Example: ``sys.exit(aioforward.bench.main(["--smoke", "--out", "/tmp/bench"]))``.
    """
    parser = configure_parser(argparse.ArgumentParser(prog="python -m aioforward bench"))
    return run(Options.from_namespace(parser.parse_args(argv)))


# What the bench imports beyond aioforward's dependencies: the bench extra brings them all
# (uvloop except on Windows, where its rows are skipped). ray is optional: its rows are skipped.
NEEDS: tuple[str, ...] = ("rich", "matplotlib", "numpy", "psutil", "uvloop")


def _missing_packages() -> list[str]:
    needed = [name for name in NEEDS if name != "uvloop" or sys.platform != "win32"]
    return [name for name in needed if importlib.util.find_spec(name) is None]


def run(options: Options) -> int:
    """Run the scenarios ``options`` selects and write the report; return the exit status
    (1 when a scenario failed, 2 when the bench's packages are missing).

    Example: ``run(Options("smoke", SMOKE, Path("bench-results")))``.
    """
    missing = _missing_packages()
    if missing:
        print(
            f"python -m aioforward bench needs {', '.join(missing)}: "
            "pip install 'aioforward[bench]'",
            file=sys.stderr,
        )
        return 2
    from rich.console import Console
    from rich.progress import Progress

    from .._malloc import keep_freed_memory

    options.out.mkdir(parents=True, exist_ok=True)
    console = Console()
    bench = Run(options.size)
    # Same malloc settings in this process (direct calls, threads) as in ProcessPool workers.
    bench.results["meta/keep_freed_memory"] = {"enabled": keep_freed_memory()}
    status: dict[str, str | None] = {}  # scenario -> None when it ran, else why not
    seconds: dict[str, float] = {}  # scenario -> how long it took
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=len(options.only))
        for scenario in SCENARIOS:
            if scenario.name not in options.only:
                status[scenario.name] = NOT_SELECTED
                continue
            progress.update(task, description=scenario.title)
            started = time.perf_counter()
            status[scenario.name] = _run_scenario(bench, scenario)
            seconds[scenario.name] = time.perf_counter() - started
            if status[scenario.name] is not None:
                console.print(f"{scenario.name}: {status[scenario.name]}")
            progress.advance(task)
    bench.results["meta/seconds"] = {"total": time.perf_counter() - t0, **seconds}
    command = " ".join(["python -m aioforward bench", *options.argv()[:-2]])
    write_report(options.out, bench, status, command, console)
    console.print(
        f"wrote {options.out}/results.json, report.md, report.png in "
        f"{bench.results['meta/seconds']['total']:.0f} s"
    )
    failed = [name for name, why in status.items() if why and why.startswith("failed")]
    if failed:
        console.print(f"[red]failed:[/] {', '.join(failed)} (tracebacks above)")
        return 1
    return 0


def _run_scenario(bench: Run, scenario: Scenario) -> str | None:
    """Run one scenario on a fresh loop of its kind; ``None``, or why it did not run."""
    torch.set_num_threads(1)  # every scenario starts from the parent at one torch thread
    try:
        if scenario.loop == "uvloop":
            if sys.platform == "win32":
                raise Skip("uvloop does not run on Windows")
            import uvloop

            uvloop.run(scenario.measure(bench))
        else:
            asyncio.run(scenario.measure(bench))
    except Skip as exc:
        return f"skipped: {exc}"
    except Exception as exc:
        traceback.print_exc()
        return f"failed: {type(exc).__name__}: {exc}"
    return None
