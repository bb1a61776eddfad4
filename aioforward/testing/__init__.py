"""Helpers for users' test suites: a loop-blocking guard and pool fixtures.

Installed as a pytest plugin (entry point ``aioforward``), which provides the fixtures

- ``aioforward_assert_loop_free``: :func:`assert_loop_free` with ``max_lag`` taken from
  ``aioforward_lag_limit``;
- ``aioforward_lag_limit``: that limit in seconds, 50 ms; override it in a conftest.py, a
  module or a class, or per test with ``@pytest.mark.parametrize``;
- ``aioforward_thread_pool``: a fresh ThreadPool, closed and checked for leaked capacity
  after the test.

::

    # conftest.py: a suite that tolerates 100 ms
    @pytest.fixture
    def aioforward_lag_limit() -> float:
        return 0.1

    # test_app.py
    async def test_endpoint(aioforward_assert_loop_free):
        async with aioforward_assert_loop_free():
            await client.get("/predict")

This module and the plugin import neither torch nor the pools: pytest loads the plugin in
every run, and a fixture imports what it needs when a test asks for it.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

from ..monitor import LagStats, LoopLagMonitor

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager

    from ..pools._base import Pool

__all__ = ["LoopFreeGuard", "assert_loop_free", "assert_pool_idle"]


@asynccontextmanager
async def assert_loop_free(
    max_lag: float = 0.05, interval: float = 0.001
) -> AsyncIterator[LoopLagMonitor]:
    """Fail with ``AssertionError`` when the event loop was blocked longer than ``max_lag``.

    Wrap the code under test; a synchronous model call inside it fails the test, wherever
    it sits (before the first await, between awaits, or last)::

        async with aioforward.testing.assert_loop_free(max_lag=0.02):
            await aioforward.forward(model, x)      # passes
            model(x)                                 # fails: the loop froze

    The check runs when the block ends without an exception; an exception from the block
    propagates unchanged. ``interval`` is the :class:`~aioforward.LoopLagMonitor` sampling
    interval. In a pytest suite, the ``aioforward_assert_loop_free`` fixture gives the same
    guard with ``max_lag`` from the ``aioforward_lag_limit`` fixture.
    """
    if not isinstance(max_lag, int | float) or not max_lag > 0:
        raise ValueError(f"max_lag must be a number of seconds > 0, got {max_lag!r}")
    async with LoopLagMonitor(interval) as monitor:
        yield monitor
    stats: LagStats = monitor.stats()
    if stats.max > max_lag:
        raise AssertionError(
            f"the event loop was blocked for {stats.max * 1e3:.1f} ms "
            f"(max_lag={max_lag * 1e3:.1f} ms, p99={stats.p99 * 1e3:.1f} ms "
            f"over {stats.samples} samples)"
        )


class LoopFreeGuard(Protocol):
    """Type of the ``aioforward_assert_loop_free`` fixture: :func:`assert_loop_free` whose
    ``max_lag`` defaults to the ``aioforward_lag_limit`` fixture.

    Example::

        async def test_forward(aioforward_assert_loop_free: LoopFreeGuard) -> None:
            async with aioforward_assert_loop_free():           # the suite's limit
                await aioforward.forward(model, x)
            async with aioforward_assert_loop_free(max_lag=0.2):  # this call's own limit
                await slow_start()
    """

    def __call__(
        self, max_lag: float | None = None, interval: float = 0.001
    ) -> AbstractAsyncContextManager[LoopLagMonitor]:
        """The guard; ``max_lag=None`` means the ``aioforward_lag_limit`` fixture's value."""
        ...


def assert_pool_idle(pool: Pool) -> None:
    """Fail unless ``pool`` has no busy slot and no queued call (every token returned).

    Example: ``aioforward.testing.assert_pool_idle(pool)`` at the end of a test.
    """
    s = pool.stats()
    if s.busy or s.queued:
        raise AssertionError(f"pool {pool!r} still has busy={s.busy} queued={s.queued}")
