"""LoopLagMonitor: how late the event loop answers, timed from a watchdog thread.

A sample is one callback posted to the loop from outside it; its lag is the time it
waited in the loop's queue, which is the time the loop was busy elsewhere::

    __aenter__ (loop thread)   post(answer)  ── queued before the guarded code runs
    watchdog thread            wait for the answer ......... answer() on the loop thread:
                                                              lag = now - posted_at
                               wait `interval`, post the next one, wait for its answer ...
    __aexit__ (loop thread)    a callback still queued counts with its age (a block at the
                               very end), then the watchdog thread is joined

Why a thread and not a heartbeat task: a task created on entry first runs at the guarded
code's first await, so a block before it went unseen, and one at the very end was cut off
by the cancellation on exit. A callback posted from the loop thread on entry is already
queued when the guarded code starts, and the watchdog posts the next one within
``interval`` of each answer, so through any longer block one callback sits waiting: the
block is timed from outside the loop, in the spirit of asyncio's debug-mode warning on
slow callbacks (``slow_callback_duration``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import sniffio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType

    Post = Callable[[Callable[[], object]], object]

__all__ = ["LagStats", "LoopLagMonitor"]

_clock = time.perf_counter


@dataclass(frozen=True)
class LagStats:
    """Event-loop lag in seconds: how long each posted callback waited for the loop.

    Example: ``LagStats(samples=40, p50=0.0001, p99=0.002, max=0.08)`` says one wait of
    80 ms among 40, the rest answered at once.
    """

    samples: int
    p50: float
    p99: float
    max: float


class LoopLagMonitor:
    """Async context manager that measures event-loop lag (p50 / p99 / max).

    A watchdog thread posts a callback to the loop, times how long the loop takes to run
    it, waits ``interval`` seconds and posts the next one; a blocking call shows up as one
    long wait, wherever it sits in the block: before the first await, between two awaits,
    or at the very end (a callback still waiting on exit counts with its age). Works on
    asyncio, uvloop and trio::

        async with aioforward.LoopLagMonitor() as lag:
            await aioforward.run_parallel(m1, m2, x)
        print(lag.stats().p99)

    ``interval`` trades resolution for cost: the loop is woken at most once per interval,
    and a block that starts while the watchdog waits is counted from the next post, so
    it reads up to ``interval`` short. The watchdog thread (``aioforward-lag-watchdog``)
    is joined on exit.
    """

    def __init__(self, interval: float = 0.001) -> None:
        if not isinstance(interval, int | float) or not interval > 0:
            raise ValueError(f"interval must be a number > 0, got {interval!r}")
        self.interval = float(interval)
        self._watchdog: _Watchdog | None = None

    async def __aenter__(self) -> LoopLagMonitor:
        # No await in here nor in __aexit__: the first callback must be queued before the
        # guarded code runs, and the last one must be read before the loop runs again.
        if self._watchdog is not None and self._watchdog.is_alive():
            raise RuntimeError("this LoopLagMonitor is already in use; create one per `async with`")
        watchdog = _Watchdog(_current_loop_poster(), self.interval)
        watchdog.post()
        watchdog.start()
        self._watchdog = watchdog
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._watchdog is not None
        self._watchdog.stop()

    def stats(self) -> LagStats:
        """Quantiles of the lags seen so far (zeros before the first answer).

        Example: ``lag.stats().max > 0.02`` after the block means the loop was stuck
        for more than 20 ms at least once.
        """
        lags = self._watchdog.lags() if self._watchdog is not None else []
        return LagStats(len(lags), *quantiles(lags))


class _Watchdog(threading.Thread):
    """Posts one callback at a time to the loop and records how long each waited.

    Between an answer and the next post it waits ``interval``: keeping a callback queued
    every instant would ping-pong between this thread and the loop, a core kept busy to
    watch it.
    """

    def __init__(self, post: Post, interval: float) -> None:
        super().__init__(name="aioforward-lag-watchdog", daemon=True)
        self._post: Post | None = post  # None once stopped: holds no closed loop alive
        self._interval = interval
        self._cond = threading.Condition()
        self._lags: list[float] = []
        self._posted_at: float | None = None  # set while a callback waits for the loop
        self._seq = 0  # tells the current callback from one left over after stop()

    def post(self) -> None:
        """Queue the next callback on the loop (from the loop thread or the watchdog)."""
        with self._cond:
            post = self._post
            if post is None:
                return
            self._seq += 1
            seq = self._seq
            self._posted_at = _clock()
        post(partial(self._answer, seq))

    def _answer(self, seq: int) -> None:
        """Runs on the loop thread; must not raise (trio would crash the run)."""
        now = _clock()
        with self._cond:
            if self._post is None or seq != self._seq or self._posted_at is None:
                return  # left over after stop(), which counted it already
            self._lags.append(now - self._posted_at)
            self._posted_at = None
            self._cond.notify_all()

    def run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                cond.wait_for(lambda: self._post is None or self._posted_at is None)
                if cond.wait_for(lambda: self._post is None, timeout=self._interval):
                    return
            try:
                self.post()
            except RuntimeError:
                # The loop closed (or the trio run ended) without leaving the monitor, as
                # when a task is abandoned: there is nothing left to watch.
                return

    def stop(self) -> None:
        """On the loop thread: count a callback still waiting, end and join the thread."""
        now = _clock()
        with self._cond:
            self._post = None
            if self._posted_at is not None:
                self._lags.append(now - self._posted_at)
                self._posted_at = None
            self._cond.notify_all()
        self.join()

    def lags(self) -> list[float]:
        with self._cond:
            return list(self._lags)


def _current_loop_poster() -> Post:
    """The running loop's thread-safe "run this callback soon" (asyncio, uvloop or trio)."""
    library = sniffio.current_async_library()
    if library == "asyncio":
        return asyncio.get_running_loop().call_soon_threadsafe
    if library == "trio":
        import trio.lowlevel  # imported here: trio is optional

        return trio.lowlevel.current_trio_token().run_sync_soon
    raise RuntimeError(
        f"LoopLagMonitor runs under asyncio (uvloop included) or trio, not {library!r}"
    )


def quantiles(samples: Iterable[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of ``samples``; zeros when there are none.

    Example: ``quantiles([0.001, 0.002, 0.05])`` is ``(0.002, 0.05, 0.05)``.
    """
    data = sorted(samples)
    if not data:
        return 0.0, 0.0, 0.0
    return data[len(data) // 2], data[min(len(data) - 1, int(len(data) * 0.99))], data[-1]
