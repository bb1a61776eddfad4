"""pytest plugin registered by aioforward (entry point ``pytest11``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ..pools.thread import ThreadPool
from . import assert_pool_idle

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def aioforward_thread_pool() -> Iterator[ThreadPool]:
    """A fresh two-thread pool; closed after the test, which fails if a call still runs."""
    pool = ThreadPool(workers=2, name="aioforward-fixture")
    try:
        yield pool
        assert_pool_idle(pool)
    finally:
        pool.close()


@pytest.fixture
def aioforward_lag_limit() -> float:
    """Largest event-loop lag (seconds) that tests using assert_loop_free accept."""
    return 0.05
