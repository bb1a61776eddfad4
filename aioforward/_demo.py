"""The demo: two modules run directly in a coroutine vs with run_parallel on each pool."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import _models
from ._api import run_parallel
from ._call import call
from ._cpus import usable_cpus
from .monitor import LoopLagMonitor
from .pools.process import ProcessPool
from .pools.thread import ThreadPool

if TYPE_CHECKING:
    from .pools._base import Pool

Round = Callable[[], Awaitable[Any]]


async def _measure(one_round: Round, rounds: int, advance: Callable[[], None]) -> dict[str, float]:
    await one_round()  # warm-up: allocator, thread pools, first-call costs
    advance()
    times = []
    async with LoopLagMonitor() as lag:
        for _ in range(rounds):
            t0 = time.perf_counter()
            await one_round()
            times.append(time.perf_counter() - t0)
            advance()
            await anyio.sleep(0.002)  # let the heartbeat see how late it is
    return {
        "wall": statistics.median(times),
        "lag_p99": lag.stats().p99,
        "lag_max": lag.stats().max,
    }


async def _demo(rounds: int, console: Console) -> list[tuple[str, dict[str, float]]]:
    torch.manual_seed(0)
    m1, m2 = _models.mlp(), _models.conv()
    x1, x2 = _models.INPUTS["mlp"](), _models.INPUTS["conv"]()
    results: list[tuple[str, dict[str, float]]] = []
    modes: list[tuple[str, Callable[[], Any]]] = []

    async def direct() -> None:
        with torch.inference_mode():
            m1(x1)
            m2(x2)

    pool: Pool | None = None

    async def parallel() -> None:
        assert pool is not None
        await run_parallel(call(m1, x1), call(m2, x2), pool=pool)

    modes = [
        (
            f"direct calls in the coroutine, one after the other ({usable_cpus()} torch threads)",
            lambda: direct,
        ),
        ("run_parallel on ThreadPool(workers=2)", lambda: parallel),
        ("run_parallel on ProcessPool(workers=2)", lambda: parallel),
    ]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("demo", total=len(modes) * (rounds + 1))
        for label, make in modes:
            progress.update(task, description=label.split(" (")[0])
            if "ThreadPool" in label:
                pool = ThreadPool(workers=2)
            elif "ProcessPool" in label:
                pool = ProcessPool(workers=2)
                await pool.warmup(m1, m2)
            try:
                results.append(
                    (label, await _measure(make(), rounds, lambda: progress.advance(task)))
                )
            finally:
                if pool is not None:
                    await pool.aclose()
                    pool = None
    return results


def run_demo(rounds: int = 8) -> int:
    """Run the demo and print a table. Example: ``python -m aioforward demo``."""
    console = Console()
    console.print(
        "[bold]aioforward demo[/]: an MLP (4 x Linear 1024, batch 256) and a conv net "
        f"(8x3x128x128), {rounds} rounds each, on {usable_cpus()} CPUs"
    )
    results = anyio.run(_demo, rounds, console)
    base = results[0][1]["wall"]
    table = Table(title="both modules, one round")
    table.add_column("how")
    table.add_column("wall time", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("loop lag p99", justify="right")
    table.add_column("loop lag max", justify="right")
    for label, r in results:
        table.add_row(
            label,
            f"{r['wall'] * 1e3:.1f} ms",
            f"{base / r['wall']:.2f}x",
            f"{r['lag_p99'] * 1e3:.1f} ms",
            f"{r['lag_max'] * 1e3:.1f} ms",
        )
    console.print(table)
    console.print(
        "Direct calls freeze the event loop for the whole forward pass; the pools keep it "
        "beating while both modules run at once."
    )
    return 0
