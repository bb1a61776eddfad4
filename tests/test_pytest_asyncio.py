"""aioforward inside a pytest-asyncio suite (strict mode): one session-scoped pool used
from function-scoped event loops, as many users' suites do."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest
import torch

import aioforward as af

from .models import Tiny

if TYPE_CHECKING:
    from collections.abc import Iterator

    from aioforward.testing import LoopFreeGuard


@pytest.fixture(scope="module")
def shared_pool() -> Iterator[af.ThreadPool]:
    with af.ThreadPool(workers=2, name="aioforward-shared") as pool:
        yield pool


@pytest.fixture(autouse=True)
def no_leaks() -> None:
    """The module-scoped pool outlives each test on purpose; its threads are not leaks."""


@pytest.mark.asyncio
async def test_first_loop(shared_pool: af.ThreadPool) -> None:
    y1, y2 = await af.run_parallel(Tiny(), Tiny(), torch.zeros(1, 10), pool=shared_pool)
    assert y1.shape == y2.shape == (1, 5)


@pytest.mark.asyncio
async def test_second_loop_same_pool(shared_pool: af.ThreadPool) -> None:
    y = await shared_pool.forward(Tiny(), torch.zeros(1, 10))
    assert y.shape == (1, 5) and shared_pool.stats().completed >= 2


@pytest.mark.asyncio
async def test_fixture_from_plugin(aioforward_thread_pool: af.ThreadPool) -> None:
    assert (await aioforward_thread_pool.forward(Tiny(), torch.zeros(1, 10))).shape == (1, 5)


@pytest.mark.asyncio
async def test_loop_free_guard_from_plugin(
    aioforward_assert_loop_free: LoopFreeGuard, shared_pool: af.ThreadPool
) -> None:
    async with aioforward_assert_loop_free():  # a forward on the pool leaves the loop free
        await shared_pool.forward(Tiny(), torch.zeros(1, 10))
    with pytest.raises(AssertionError, match="blocked for"):
        async with aioforward_assert_loop_free(max_lag=0.02):
            time.sleep(0.08)  # before the first await: caught all the same
            await asyncio.sleep(0.005)
