"""pytest plugin registered by aioforward (entry point ``pytest11``).

pytest imports this module in every run of every project that has aioforward installed,
so it imports only pytest at load: each fixture imports what it needs (the pools, and
torch with them) when a test first asks for it, as anyio loads a backend on first use. It is
a top-level module, not ``aioforward.testing._plugin``, because importing anything inside
the ``aioforward`` package first imports the package, and torch with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractAsyncContextManager

    from aioforward import LoopLagMonitor, ThreadPool
    from aioforward.testing import LoopFreeGuard


@pytest.fixture
def aioforward_thread_pool() -> Iterator[ThreadPool]:
    """A fresh two-thread pool; closed after the test, which fails if a call still runs.

    Example::

        async def test_forward(aioforward_thread_pool):
            y = await aioforward_thread_pool.forward(model, x)
    """
    from aioforward import ThreadPool
    from aioforward.testing import assert_pool_idle

    pool = ThreadPool(workers=2, name="aioforward-fixture")
    try:
        yield pool
        assert_pool_idle(pool)
    finally:
        pool.close()


@pytest.fixture
def aioforward_lag_limit() -> float:
    """Largest event-loop lag, in seconds, that ``aioforward_assert_loop_free`` accepts: 50 ms.

    Override it like any pytest fixture: in a conftest.py (the whole directory), a test
    module or a class, or for one test with ``parametrize``::

        # conftest.py
        @pytest.fixture
        def aioforward_lag_limit() -> float:
            return 0.1

        # one test
        @pytest.mark.parametrize("aioforward_lag_limit", [0.2])
        async def test_cold_start(aioforward_assert_loop_free): ...
    """
    return 0.05


@pytest.fixture
def aioforward_assert_loop_free(aioforward_lag_limit: float) -> LoopFreeGuard:
    """:func:`aioforward.testing.assert_loop_free` with ``max_lag`` from ``aioforward_lag_limit``.

    Example (the test fails when the block stalls the loop longer than the limit)::

        async def test_endpoint(aioforward_assert_loop_free):
            async with aioforward_assert_loop_free():
                await client.get("/predict")
            async with aioforward_assert_loop_free(max_lag=0.5):  # this block's own limit
                await client.get("/warmup")
    """
    from aioforward.testing import assert_loop_free

    def guard(
        max_lag: float | None = None, interval: float = 0.001
    ) -> AbstractAsyncContextManager[LoopLagMonitor]:
        return assert_loop_free(aioforward_lag_limit if max_lag is None else max_lag, interval)

    return guard
