"""LoopLagMonitor: it sees a blocked loop wherever the block sits, on every loop, and
leaves no thread behind; quantiles."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

import aioforward as af
from aioforward.monitor import quantiles

pytestmark = pytest.mark.anyio


class TestLoopLagMonitor:
    async def test_sees_a_blocked_loop(self) -> None:
        async with af.LoopLagMonitor(interval=0.001) as lag:
            await anyio.sleep(0.02)
            time.sleep(0.05)  # block the loop on purpose
            await anyio.sleep(0.02)
        s = lag.stats()
        assert s.samples >= 5 and s.max >= 0.04 and s.p50 < 0.01

    async def test_sees_a_block_before_the_first_await(self) -> None:
        async with af.LoopLagMonitor() as lag:
            time.sleep(0.05)
            await anyio.sleep(0.005)
        assert lag.stats().max >= 0.045

    async def test_sees_a_block_at_the_very_end(self) -> None:
        async with af.LoopLagMonitor() as lag:
            await anyio.sleep(0.005)
            time.sleep(0.05)
        assert lag.stats().max >= 0.04  # the watchdog may post up to 1 ms into the block

    async def test_quiet_loop_is_free(self) -> None:
        async with af.LoopLagMonitor() as lag:
            await anyio.sleep(0.05)
        # Below the 50 ms block of the test above; this VM alone has stalled a beat for 27 ms.
        assert lag.stats().samples >= 5 and lag.stats().max < 0.045

    async def test_interval_spaces_the_samples(self) -> None:
        async with af.LoopLagMonitor(interval=0.02) as lag:
            await anyio.sleep(0.1)
        assert 2 <= lag.stats().samples <= 7  # about 0.1 / 0.02, plus the one on exit

    async def test_watchdog_thread_is_joined_on_exit(self) -> None:
        async with af.LoopLagMonitor():
            assert "aioforward-lag-watchdog" in {t.name for t in threading.enumerate()}
        assert "aioforward-lag-watchdog" not in {t.name for t in threading.enumerate()}

    async def test_one_async_with_at_a_time(self) -> None:
        lag = af.LoopLagMonitor()
        async with lag:
            with pytest.raises(RuntimeError, match="already in use"):
                await lag.__aenter__()
        async with lag:  # reusable once left: the samples start afresh
            await anyio.sleep(0.005)
        assert lag.stats().samples >= 1

    def test_stats_before_entry_are_zeros(self) -> None:
        assert af.LoopLagMonitor().stats() == af.LagStats(0, 0.0, 0.0, 0.0)

    def test_bad_interval(self) -> None:
        with pytest.raises(ValueError, match="interval must be a number > 0, got 0"):
            af.LoopLagMonitor(interval=0)


def test_quantiles() -> None:
    assert quantiles([]) == (0.0, 0.0, 0.0)
    assert quantiles([0.05, 0.001, 0.002]) == (0.002, 0.05, 0.05)
    assert quantiles(float(i) for i in range(1, 201)) == (101.0, 199.0, 200.0)
