from __future__ import annotations

import time

import anyio
import pytest

import aioforward as af
from aioforward.testing import assert_loop_free

pytestmark = pytest.mark.anyio


async def test_monitor_sees_a_blocked_loop() -> None:
    async with af.LoopLagMonitor(interval=0.001) as lag:
        await anyio.sleep(0.02)
        time.sleep(0.05)  # block the loop on purpose
        await anyio.sleep(0.02)
    s = lag.stats()
    assert s.samples >= 5 and s.max >= 0.04 and s.p50 < 0.01


async def test_monitor_quiet_loop_is_free() -> None:
    async with af.LoopLagMonitor() as lag:
        await anyio.sleep(0.05)
    # Below the 50 ms block of the test above; this VM alone has stalled a beat for 27 ms.
    assert lag.stats().max < 0.045


async def test_assert_loop_free_fails_on_blocking_call() -> None:
    with pytest.raises(AssertionError, match="blocked for"):
        async with assert_loop_free(max_lag=0.02):
            await anyio.sleep(0.005)
            time.sleep(0.05)
            await anyio.sleep(0.005)


def test_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval"):
        af.LoopLagMonitor(interval=0)
