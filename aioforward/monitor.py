"""LoopLagMonitor: how long the event loop was late, measured by a heartbeat."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import TracebackType

__all__ = ["LagStats", "LoopLagMonitor"]


@dataclass(frozen=True)
class LagStats:
    """Event-loop lag in seconds: how late each heartbeat woke up."""

    samples: int
    p50: float
    p99: float
    max: float


class LoopLagMonitor:
    """Async context manager that measures event-loop lag (p50 / p99 / max).

    A heartbeat task sleeps ``interval`` seconds again and again; the time it
    wakes up late is the time the loop was busy elsewhere (a blocking call
    shows up as one long lag). Works on asyncio, uvloop and trio::

        async with aioforward.LoopLagMonitor() as lag:
            await aioforward.run_parallel(m1, m2, x)
        print(lag.stats().p99)
    """

    def __init__(self, interval: float = 0.001) -> None:
        if not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"interval must be a number > 0, got {interval!r}")
        self.interval = float(interval)
        self._lags: list[float] = []
        self._tg: anyio.abc.TaskGroup | None = None

    async def _beat(self) -> None:
        interval, lags, clock = self.interval, self._lags, time.perf_counter
        while True:
            t0 = clock()
            await anyio.sleep(interval)
            lags.append(max(0.0, clock() - t0 - interval))

    async def __aenter__(self) -> LoopLagMonitor:
        self._lags.clear()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._beat)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(exc_type, exc, tb)

    def stats(self) -> LagStats:
        """Quantiles of the lags seen so far (zeros before the first heartbeat)."""
        return LagStats(len(self._lags), *quantiles(self._lags))


def quantiles(samples: Iterable[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of ``samples``; zeros when there are none."""
    data = sorted(samples)
    if not data:
        return 0.0, 0.0, 0.0
    return data[len(data) // 2], data[min(len(data) - 1, int(len(data) * 0.99))], data[-1]
