"""The demo: two modules run directly in a coroutine vs with run_parallel on each pool.

Each pool's rounds alternate with the same two calls awaited one after the other on that
pool, so the table shows both what the pool costs against direct calls and how much the two
modules overlap ("at once": one after the other / run_parallel, on the same pool).

Output goes through rich when it is installed (``pip install 'aioforward[cli]'``), else as plain
text: ``python -m aioforward demo`` works on a bare install.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import torch

from . import _models
from ._api import run_parallel
from ._call import call
from ._cpus import usable_cpus
from ._malloc import keep_freed_memory
from .monitor import LoopLagMonitor
from .pools.process import ProcessPool
from .pools.thread import ThreadPool

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console
    from rich.progress import Progress, TaskID

    from .pools._base import Pool

Round = Callable[[], Awaitable[Any]]
# (how, {"wall", "lag_p99", "lag_max"} in seconds, and "serial" for a pool: the same two calls
# awaited one after the other on that pool)
Result = tuple[str, dict[str, float]]
COLUMNS = ("how", "wall time", "speed-up", "at once", "lag p99", "lag max")


class _PlainOutput:
    """Output without rich: one line per mode as it starts, then an aligned text table."""

    def header(self, text: str) -> None:
        print(text, flush=True)

    def start(self, total: int) -> None:
        pass

    def mode(self, label: str) -> None:
        print(f"  running: {label}", flush=True)

    def advance(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def table(self, title: str, rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

        def line(cells: Sequence[str]) -> str:
            first, *rest = (
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            return "  ".join([first, *rest]).rstrip()

        print(f"\n{title}\n{line(COLUMNS)}\n{line(['-' * w for w in widths])}")
        print("\n".join(line(r) for r in rows), flush=True)


class _RichOutput:
    """Output through rich: a transient progress bar, then a table."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console: Console = Console()
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def header(self, text: str) -> None:
        self.console.print(text, markup=False)

    def start(self, total: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("demo", total=total)

    def mode(self, label: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=label)

    def advance(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def table(self, title: str, rows: Sequence[Sequence[str]]) -> None:
        from rich import box
        from rich.table import Table

        table = Table(title=title, box=box.SIMPLE_HEAD)  # fits 80 columns
        for i, col in enumerate(COLUMNS):
            table.add_column(col, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*r)
        self.console.print(table)


Output = _PlainOutput | _RichOutput


def _output(plain: bool | None) -> Output:
    if plain is None:
        try:
            import rich  # noqa: F401  (an optional extra: aioforward[cli])
        except ImportError:
            plain = True
        else:
            plain = False
    return _PlainOutput() if plain else _RichOutput()


async def _measure(
    one_round: Round, rounds: int, advance: Callable[[], None], serial: Round | None = None
) -> dict[str, float]:
    """Median wall time of ``one_round`` and the loop's lag meanwhile; with ``serial``, each
    round is followed by one of it (interleaved, so the machine's drift hits both alike)."""
    await one_round()  # warm-up: allocator, thread pools, first-call costs
    if serial is not None:
        await serial()
    advance()
    times: list[float] = []
    serial_times: list[float] = []
    async with LoopLagMonitor() as lag:
        for _ in range(rounds):
            for fn, into in ((one_round, times), (serial, serial_times)):
                if fn is not None:
                    t0 = time.perf_counter()
                    await fn()
                    into.append(time.perf_counter() - t0)
                    await anyio.sleep(0.002)  # let the heartbeat see how late it is
            advance()
    result = {
        "wall": statistics.median(times),
        "lag_p99": lag.stats().p99,
        "lag_max": lag.stats().max,
    }
    if serial_times:
        result["serial"] = statistics.median(serial_times)
    return result


async def _demo(rounds: int, out: Output) -> list[Result]:
    torch.manual_seed(0)
    m1, m2 = _models.mlp(), _models.conv()
    x1, x2 = _models.INPUTS["mlp"](), _models.INPUTS["conv"]()

    async def direct() -> None:
        with torch.inference_mode():
            m1(x1)
            m2(x2)

    label = f"direct, {usable_cpus()} torch threads"
    out.start(3 * (rounds + 1))
    try:
        out.mode(label)
        results: list[Result] = [(label, await _measure(direct, rounds, out.advance))]
        make_pool: Callable[[], Pool]
        for label, make_pool in (
            ("ThreadPool(workers=2)", lambda: ThreadPool(workers=2)),
            ("ProcessPool(workers=2)", lambda: ProcessPool(workers=2)),
        ):
            out.mode(label)
            async with make_pool() as pool:
                # every worker runs each module once: a module's first pass in a worker
                # (oneDNN's kernels for those shapes, the allocator) costs several passes
                await pool.warmup(m1, example=x1)
                await pool.warmup(m2, example=x2)

                async def parallel(pool: Pool = pool) -> None:
                    await run_parallel(call(m1, x1), call(m2, x2), pool=pool)

                async def serial(pool: Pool = pool) -> None:
                    await pool.forward(m1, x1)
                    await pool.forward(m2, x2)

                results.append((label, await _measure(parallel, rounds, out.advance, serial)))
    finally:
        out.stop()
    return results


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    """The demo table's rows: wall time, speed-up over the first row, how much the two
    modules overlap on that pool (its one-after-the-other time / its run_parallel time; blank
    without one), loop lag.

    Example: ``table_rows([("direct", {"wall": 0.03, "lag_p99": 0.03, "lag_max": 0.03})])``
    gives ``[["direct", "30.0 ms", "1.00x", "", "30.0 ms", "30.0 ms"]]``.
    """
    base = results[0][1]["wall"]
    return [
        [
            label,
            f"{r['wall'] * 1e3:.1f} ms",
            f"{base / r['wall']:.2f}x",
            f"{r['serial'] / r['wall']:.2f}x" if "serial" in r else "",
            f"{r['lag_p99'] * 1e3:.1f} ms",
            f"{r['lag_max'] * 1e3:.1f} ms",
        ]
        for label, r in results
    ]


def run_demo(rounds: int = 8, *, plain: bool | None = None) -> int:
    """Run the demo and print a table; return the exit status. ``plain`` forces plain-text
    output (``True``) or rich (``False``); by default rich is used when installed.

    Example: ``python -m aioforward demo --rounds 8``, or ``run_demo(rounds=2, plain=True)``.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    out = _output(plain)
    out.header(
        "aioforward demo: an MLP (4 x Linear 1024, batch 256) and a conv net "
        f"(8x3x128x128), {rounds} round{'s' if rounds != 1 else ''} each, on {usable_cpus()} CPUs"
    )
    keep_freed_memory()  # as the README advises for a conv net, and as the workers have it
    results = anyio.run(_demo, rounds, out)
    out.table("both modules, one round", table_rows(results))
    cpus = usable_cpus()
    if any(results[0][1]["wall"] > cpus * r["wall"] for _, r in results[1:]):
        out.header(
            f"A speed-up above the {cpus} CPUs here means the direct calls were slowed down "
            "(other programs on the machine, whose load hurts torch's threads most): run it "
            "again on an idle machine to compare."
        )
    out.header(
        "Each pool's row is `await run_parallel(mlp, conv)` on it; 'at once' is that against "
        "the same two calls awaited one after the other on that pool (two equal modules "
        "overlapping perfectly: 2.00x). 'lag' is how late the event loop's heartbeat ran: "
        "direct calls freeze the loop for the whole forward pass, the pools keep it beating."
    )
    out.header(
        f"Direct calls use torch's {cpus} threads inside each forward pass. Where that keeps "
        "every core busy already (large matrix products on few cores) two modules at once "
        "cannot beat it; they pay where one forward pass leaves cores idle (small batches, "
        "Python-heavy modules, more cores than one pass scales to)."
    )
    return 0
