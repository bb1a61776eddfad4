"""One approach's per-call cost for a tiny module, in a process that does nothing else.

``main([VARIANT, LOOP, CALLS])`` prints the median seconds per call of ``CALLS`` calls after
a warm-up; the ``overhead-alone`` scenario runs it in a fresh process once per variant per
round. In one process with every approach open (``overhead``), the kernel places each
approach's threads and processes beside what the others left behind; alone, an approach gets
the placement a program that makes only these calls gets, and on a 2-vCPU machine that moved
a thread hop between 34 and 102 us per call.
"""

from __future__ import annotations

import asyncio
import multiprocessing

from .. import _models
from ..pools.process import ProcessPool
from ..pools.thread import ThreadPool
from . import _alternatives as alt
from ._measure import Run, Step, rounds

VARIANTS: tuple[tuple[str, str], ...] = (  # (variant, the event loop it runs on)
    ("pipe-floor", "asyncio"),
    ("ProcessPool", "asyncio"),
    ("ProcessPool", "trio"),  # skipped where trio is not installed (an extra)
    ("direct", "uvloop"),
    ("to_thread", "uvloop"),
    ("ThreadPool", "uvloop"),
)
WARMUP = 300


async def _time(step: Step, calls: int) -> float:
    return await rounds(Run("full"), "alone", step, calls, warmup=WARMUP)


async def measure(variant: str, calls: int) -> float:
    """The median seconds per call of ``variant`` (named in ``VARIANTS``).

    Example: ``asyncio.run(measure("ThreadPool", 1000))``.
    """
    m, x = _models.tiny(), _models.INPUTS["tiny"]()
    if variant == "pipe-floor":
        async with alt.echo_round_trip(multiprocessing.get_context("spawn")) as pipe:
            return await _time(pipe, calls)
    if variant == "ProcessPool":
        async with ProcessPool(workers=2) as pp:
            await pp.warmup(m, example=x)
            return await _time(lambda: pp.forward(m, x), calls)
    if variant == "ThreadPool":
        async with ThreadPool(workers=2) as tp:
            return await _time(lambda: tp.forward(m, x), calls)
    if variant == "to_thread":
        return await _time(lambda: asyncio.to_thread(alt.direct, m, x), calls)
    if variant == "direct":
        return await _time(lambda: alt.awaited(alt.direct, m, x), calls)
    names = ", ".join(dict(VARIANTS))  # each name once (ProcessPool runs on two loops)
    raise ValueError(f"variant must be one of {names}, got {variant!r}")


def main(argv: list[str]) -> None:
    """Print the median seconds per call of one variant on one loop.

    Example: ``main(["ThreadPool", "uvloop", "1000"])``.
    """
    variant, loop, calls = argv[0], argv[1], int(argv[2])
    if loop == "uvloop":
        import uvloop

        median = uvloop.run(measure(variant, calls))
    elif loop == "trio":
        import trio

        median = trio.run(measure, variant, calls)
    else:
        median = asyncio.run(measure(variant, calls))
    print(repr(median))
