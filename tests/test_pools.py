"""Behaviour every pool shares (capacity, cancellation, timeouts, lifecycle, loops),
run against each backend."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time

import anyio
import pytest
import torch
import trio

import aioforward as af

from .conftest import assert_pool_idle
from .models import Gate, Tiny

pytestmark = pytest.mark.anyio


async def test_cancel_queued_call_never_runs() -> None:
    gate, queued = Gate(), Gate()
    queued.release.set()
    async with af.ThreadPool(workers=1) as pool:
        running = pool.submit(gate, torch.zeros(1))
        waiting = pool.submit(queued, torch.zeros(1))
        assert pool.stats().queued == 1 and not waiting.running()
        assert waiting.cancel()
        assert pool.stats().queued == 0
        gate.release.set()
        await running
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result()
    assert queued.calls == 0
    assert_pool_idle(pool)


async def test_cancel_running_releases_caller_and_keeps_slot_busy() -> None:
    gate = Gate()
    async with af.ThreadPool(workers=1) as pool:
        with anyio.move_on_after(0.2) as scope:
            await pool.forward(gate, torch.zeros(1))
        assert scope.cancelled_caught and gate.entered.is_set()
        s = pool.stats()
        assert (s.busy, s.cancelled) == (1, 1)  # the thread is still inside forward
        gate.release.set()
        with anyio.fail_after(5):
            while pool.stats().busy:
                await anyio.sleep(0.01)
        y = await pool.forward(Tiny(), torch.zeros(1, 10))  # the slot came back
    assert y.shape == (1, 5)


async def test_cancellation_is_reraised_not_swallowed() -> None:
    gate = Gate()
    async with af.ThreadPool(workers=1) as pool:
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.forward, gate, torch.zeros(1))
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert tg.cancel_scope.cancelled_caught
        gate.release.set()


async def test_timeout_raises_builtin_timeout_error() -> None:
    gate = Gate()
    async with af.ThreadPool(workers=1) as pool:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.forward(gate, torch.zeros(1), timeout=0.1)
        assert time.monotonic() - t0 < 1.0
        # a queued call times out too, and never runs
        other = Gate()
        with pytest.raises(TimeoutError):
            await pool.forward(other, torch.zeros(1), timeout=0.05)
        assert other.calls == 0
        gate.release.set()


async def test_a_queued_call_cancelled_as_it_times_out_counts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller cancels a queued call just as its deadline passes, and the cancel wins: the
    call counts as cancelled, not also as failed."""
    from aioforward.pools import _base

    complete = _base._complete

    def cancelled_first(fut: af.ForwardFuture[object], result: object, exc: object) -> bool:
        if isinstance(exc, TimeoutError):
            fut.cancel()  # the other thread gets there first
        return complete(fut, result, exc)  # type: ignore[arg-type]

    monkeypatch.setattr(_base, "_complete", cancelled_first)
    gate = Gate()
    async with af.ThreadPool(workers=1) as pool:
        running = pool.submit(gate, torch.zeros(1))
        queued = pool.submit_call(af.call(Tiny(), torch.zeros(1, 10)), timeout=0.05)
        with pytest.raises(concurrent.futures.CancelledError):
            await queued
        gate.release.set()
        await running
        s = pool.stats()
        assert (s.completed, s.failed, s.cancelled, s.queued) == (1, 0, 1, 0)


async def test_a_result_does_not_live_as_long_as_its_timeout() -> None:
    """The deadline of a call that ended is forgotten with it: its result is freed once the
    caller drops it (not 300 s later), and the pool's timer does not pile up entries."""
    import gc
    import weakref

    async with af.ThreadPool(workers=1) as pool:
        m, x = Tiny(), torch.zeros(1, 10)
        refs = []
        for _ in range(200):
            y = await pool.forward(m, x, timeout=300)
            refs.append(weakref.ref(y))
            del y
        gc.collect()
        assert [r for r in refs if r() is not None] == []
        assert len(pool._core._timer._heap) <= 2 * 64 + 2  # cancelled entries are compacted


async def test_capacity_is_fifo_and_bounded() -> None:
    order: list[int] = []
    lock = threading.Lock()
    in_flight = [0, 0]  # current, max

    class Rec(torch.nn.Module):
        def forward(self, i: int) -> int:
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight[1], in_flight[0])
            time.sleep(0.002)
            with lock:
                order.append(i)
                in_flight[0] -= 1
            return i

    m = Rec()
    async with af.ThreadPool(workers=1) as pool:
        futs = [pool.submit(m, i) for i in range(20)]
        results = [await f for f in futs]
    assert results == list(range(20)) and order == list(range(20)) and in_flight[1] == 1


async def test_max_queued_gives_queue_full_at_once() -> None:
    gate = Gate()
    async with af.ThreadPool(workers=1, max_queued=2) as pool:
        running = pool.submit(gate, torch.zeros(1))
        q = [pool.submit(gate, torch.zeros(1)) for _ in range(2)]
        with pytest.raises(af.QueueFullError, match="max_queued=2"):
            pool.submit(gate, torch.zeros(1))
        gate.release.set()
        for f in [running, *q]:
            await f


async def test_submit_after_close_raises() -> None:
    pool = af.ThreadPool(workers=1)
    await pool.aclose()
    assert pool.closed
    with pytest.raises(af.PoolClosedError, match="closed"):
        pool.submit(Tiny(), torch.zeros(1, 10))
    with pytest.raises(af.PoolClosedError):
        await pool.forward(Tiny(), torch.zeros(1, 10))
    with pytest.raises(af.PoolClosedError, match="has been closed"):
        async with pool:  # entering it again says so at once
            pass
    await pool.aclose()  # idempotent


def test_close_fails_queued_calls() -> None:
    gate = Gate()
    pool = af.ThreadPool(workers=1)
    running = pool.submit(gate, torch.zeros(1))
    queued = pool.submit(gate, torch.zeros(1))
    threading.Timer(0.1, gate.release.set).start()
    pool.close()
    assert running.result().item() == 1
    with pytest.raises(af.PoolClosedError):
        queued.result()


def test_a_loop_that_moved_thread_is_woken_from_its_old_one() -> None:
    """A task starts awaiting a call on a loop run in this thread; the loop then runs on in
    another thread, and this thread cancels the call: the task must wake at once (the
    wake-up used to treat this thread as the loop's own, and the loop slept on)."""
    gate = Gate()
    with af.ThreadPool(workers=1) as pool:
        loop = asyncio.new_event_loop()
        fut = pool.submit(gate, torch.zeros(1))

        async def waiting() -> None:
            await fut

        async def start() -> asyncio.Task[None]:
            task = asyncio.ensure_future(waiting())
            await asyncio.sleep(0.05)  # the task now waits on the call
            return task

        task = loop.run_until_complete(start())
        ended: list[float] = []

        def run_on() -> None:
            t0 = time.monotonic()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait_for(task, 5))
            ended.append(time.monotonic() - t0)

        other = threading.Thread(target=run_on)
        other.start()
        time.sleep(0.2)  # the loop sleeps in the other thread
        fut.cancel()
        other.join(10)
        gate.release.set()
        loop.close()
    assert task.cancelled() or isinstance(task.exception(), concurrent.futures.CancelledError)
    assert ended and ended[0] < 2, ended


def test_one_pool_serves_successive_loops_and_threads() -> None:
    m, x = Tiny(), torch.randn(1, 10)

    async def use(pool: af.Pool) -> torch.Tensor:
        a, b = await pool.run_parallel(m, m, x)
        return a - b

    with af.ThreadPool(workers=2) as pool:
        asyncio.run(use(pool))
        trio.run(use, pool)
        asyncio.run(use(pool))
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            outs = list(ex.map(lambda _: pool.submit(m, x).result(5), range(16)))
        assert len(outs) == 16
        assert pool.stats().completed == 6 + 16


async def test_map_ordered_unordered_and_sync() -> None:
    class Double(torch.nn.Module):
        def forward(self, v: int) -> int:
            time.sleep(0.001 * (v % 3))
            return 2 * v

    m = Double()
    async with af.ThreadPool(workers=2) as pool:
        got = [y async for y in pool.map(m, range(10), max_in_flight=3)]
        assert got == [2 * i for i in range(10)]
        unordered = [y async for y in pool.map(m, range(10), ordered=False)]
        assert sorted(unordered) == got
        assert list(pool.map(m, range(5))) == got[:5]
        with pytest.raises(ValueError, match="max_in_flight"):
            pool.map(m, range(3), max_in_flight=0)
        with pytest.raises(TypeError, match="one iterable of inputs per argument of fn, got int 5"):
            pool.map(m, 5)
        with pytest.raises(TypeError, match="got NoneType None as iterable 2"):
            pool.map(m, range(3), None)


async def test_stats_count_and_split_latency() -> None:
    async with af.ThreadPool(workers=2) as pool:
        for _ in range(5):
            await pool.forward(Tiny(), torch.zeros(1, 10))
        with pytest.raises(ValueError, match="boom"):
            from .models import Boom

            await pool.forward(Boom(), torch.zeros(1))
        s = pool.stats()
    assert (s.workers, s.completed, s.failed, s.busy, s.queued) == (2, 5, 1, 0, 0)
    assert 0 < s.compute.p50 <= s.compute.p99 <= s.compute.max
    assert s.queue.p50 >= 0


async def test_warmup_builds_specs_and_runs_example() -> None:
    from .models import build_tiny

    spec = af.ModuleSpec(build_tiny, 3)
    async with af.ThreadPool(workers=2) as pool:
        await pool.warmup(spec, Tiny(), example=torch.zeros(1, 10))
        await pool.warmup(spec)
        y1 = await pool.forward(spec, torch.ones(1, 10))
        y2 = await pool.forward(spec, torch.ones(1, 10))
    torch.testing.assert_close(y1, y2)
    with torch.inference_mode():
        torch.testing.assert_close(y1, build_tiny(3)(torch.ones(1, 10)))


async def test_exception_keeps_type_and_pool_survives() -> None:
    from .models import Boom

    async with af.ThreadPool(workers=1) as pool:
        with pytest.raises(ValueError, match=r"boom: \(2, 3\)"):
            await pool.forward(Boom(), torch.zeros(2, 3))
        with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
            await pool.forward(Tiny(), torch.zeros(2, 3))
        y = await pool.forward(Tiny(), torch.zeros(1, 10))
    assert y.shape == (1, 5)
