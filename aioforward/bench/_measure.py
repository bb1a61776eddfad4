"""How the bench measures: one run's figures, and the timing loops that fill them.

Each figure is a median over repeats after a warm-up. Variants that are compared are timed
round-robin (:func:`interleaved`), so drift on a shared machine hits them alike and their
ratios hold even when absolute times move.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..monitor import LoopLagMonitor

Size = Literal["full", "quick", "smoke"]
Figures = dict[str, float]  # e.g. {"median": s, "min": s, "max": s, "n": count}
Results = dict[str, Figures]  # figure name -> its figures
Step = Callable[[], Awaitable[Any]]
SETTLE_S = 0.05  # after a variant at more than one torch thread, before the next one


class Measured(float):
    """Returned by a step that times itself (seconds): :func:`interleaved` records it
    instead of the step's wall time."""


class Skip(Exception):
    """A scenario cannot run here (an optional package, a GPU); the message says why."""


@dataclass
class Run:
    """One bench run: how long to measure, and what it measured.

    Example: ``run = Run("smoke"); await rounds(run, "x", step, run.n(15, 5, 2))``.
    """

    size: Size
    results: Results = field(default_factory=dict)

    def n(self, full: int, quick: int, smoke: int) -> int:
        """The repeat count for this run's size.

        Example: ``Run("quick").n(2000, 300, 100) == 300``.
        """
        return {"full": full, "quick": quick, "smoke": smoke}[self.size]


def record(run: Run, name: str, samples: list[float]) -> float:
    """Store the median, min, max and count of ``samples`` (seconds) under ``name``.

    Example: ``record(run, "start/ProcessPool", [1.2, 1.1, 1.3]) == 1.2``.
    """
    run.results[name] = {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }
    return run.results[name]["median"]


async def rounds(run: Run, name: str, step: Step, n: int, warmup: int = 1) -> float:
    """Time ``n`` awaits of ``step()`` after ``warmup`` untimed ones; record their median.

    Example: ``await rounds(run, "mlp/Ray", both, 10)``.
    """
    for _ in range(warmup):
        await step()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await step()
        ts.append(time.perf_counter() - t0)
    return record(run, name, ts)


async def per_call(run: Run, name: str, step: Step, n: int) -> float:
    """Many short calls: :func:`rounds` with a longer warm-up (10%, at least 5 calls).

    Example: ``await per_call(run, "asyncio/tiny/RayPool", lambda: pool.forward(m, x), 500)``.
    """
    return await rounds(run, name, step, n, warmup=max(5, n // 10))


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which each index directly follows each other one equally
    often (a Williams design): ``n`` orders for an even ``n``, ``2 * n`` for an odd one.
    Rotating one order would not do: each index would follow the same neighbour every time
    but once (with the bench's pause after a baseline at two torch threads, the variant after
    it always started on cores the host had let go cold).

    Example: ``balanced_orders(3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0], [0, 2, 1],
    [1, 0, 2]]``.
    """
    first = [0] + [(j + 1) // 2 if j % 2 else n - j // 2 for j in range(1, n)]  # 0 1 n-1 2 ..
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    if n % 2:  # an odd count needs each order reversed too
        orders += [order[::-1] for order in orders]
    return orders


async def interleaved(
    run: Run, variants: dict[str, tuple[Step, int]], n: int, block: int = 1
) -> None:
    """Time the variants round-robin (``block`` calls per turn, ``n`` turns), each at its
    torch thread count, after one warm-up turn each; record each variant's median, and the
    medians of the first, second and last third of its samples (``round1`` ... ``round3``).
    The turns take the variants in the orders of :func:`balanced_orders`, so that each
    follows each of the others alike: what a variant leaves behind (a spinning OpenMP team,
    cold caches, cores left idle during a pause) does not always tax the same neighbour.

    Example: ``await interleaved(run, {"a": (step_a, 1), "b": (step_b, 2)}, 15)``.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    items = list(variants.items())
    orders = balanced_orders(len(items))
    for turn, warm in enumerate([True] + [False] * n):
        for name, (step, threads) in (items[i] for i in orders[turn % len(orders)]):
            torch.set_num_threads(threads)
            for _ in range(block):
                t0 = time.perf_counter()
                out = await step()
                if not warm:
                    dt = time.perf_counter() - t0
                    samples[name].append(float(out) if isinstance(out, Measured) else dt)
                del out
            if threads > 1:
                # A baseline run on torch's OpenMP team (direct calls at default threads):
                # the team's threads spin for milliseconds after it, on the cores the next
                # variant needs. Let them stop, so the baseline does not tax its neighbour.
                await asyncio.sleep(SETTLE_S)
    torch.set_num_threads(1)
    for name, ts in samples.items():
        record(run, name, ts)
        third = len(ts) // 3
        if third:  # the median of each third of the run, in time order: is it stable?
            for i in range(3):
                run.results[name][f"round{i + 1}"] = statistics.median(
                    ts[i * third : (i + 1) * third]
                )


async def lag_during(run: Run, name: str, step: Step, n: int) -> None:
    """Record the event loop's heartbeat lag (p50, p99, max) while ``step()`` runs ``n``
    times, with a 2 ms sleep between them so a blocking round shows as one late beat.

    Example: ``await lag_during(run, "lag/mlp/direct", serial, 15)``.
    """
    await step()
    async with LoopLagMonitor() as lag:
        for _ in range(n):
            await step()
            await asyncio.sleep(0.002)
    s = lag.stats()
    run.results[name] = {"p50": s.p50, "p99": s.p99, "max": s.max, "samples": s.samples}


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes.

    Example: ``timed(lambda: seed_call("tiny", x))``.
    """
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
