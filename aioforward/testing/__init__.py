"""Helpers for users' test suites: a loop-blocking guard and pool fixtures.

Installed as a pytest plugin (entry point ``aioforward``), which provides the
fixtures ``aioforward_thread_pool`` (a fresh ThreadPool, closed and checked for
leaked capacity after the test) and ``aioforward_lag_limit`` (the default
``max_lag`` for :func:`assert_loop_free`, 50 ms; override it in a conftest).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ..monitor import LagStats, LoopLagMonitor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from ..pools._base import Pool

__all__ = ["assert_loop_free", "assert_pool_idle"]


@asynccontextmanager
async def assert_loop_free(
    max_lag: float = 0.05, interval: float = 0.001
) -> AsyncIterator[LoopLagMonitor]:
    """Fail with ``AssertionError`` when the event loop was blocked longer than ``max_lag``.

    Wrap the code under test; a synchronous model call inside it fails the test::

        async with aioforward.testing.assert_loop_free(max_lag=0.02):
            await aioforward.forward(model, x)      # passes
            model(x)                                 # fails: the loop froze
    """
    async with LoopLagMonitor(interval) as monitor:
        yield monitor
    stats: LagStats = monitor.stats()
    if stats.max > max_lag:
        raise AssertionError(
            f"the event loop was blocked for {stats.max * 1e3:.1f} ms "
            f"(max_lag={max_lag * 1e3:.1f} ms, p99={stats.p99 * 1e3:.1f} ms "
            f"over {stats.samples} beats)"
        )


def assert_pool_idle(pool: Pool) -> None:
    """Fail unless ``pool`` has no busy slot and no queued call (every token returned).

    Example: ``aioforward.testing.assert_pool_idle(pool)`` at the end of a test.
    """
    s = pool.stats()
    if s.busy or s.queued:
        raise AssertionError(f"pool {pool!r} still has busy={s.busy} queued={s.queued}")
