"""Streaming (``pool.stream``) and cooperative cancellation (scenarios 39 and 40), on every
pool that supports them and on the three loops."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import anyio
import pytest
import torch

import aioforward as af
from aioforward._cancel import stacks

from . import models as M
from .conftest import pool_factory

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["thread", "process", "ray", "cuda"])
def make_pool(request: pytest.FixtureRequest) -> Iterator[Callable[..., af.Pool]]:
    yield from pool_factory(request, 1)


def kind(make: Callable[..., af.Pool]) -> str:
    return make.kind  # type: ignore[attr-defined,no-any-return]


def placed(make: Callable[..., af.Pool], module: torch.nn.Module) -> torch.nn.Module:
    """``module`` where the pool runs it: a CUDA pool takes modules already on its device."""
    return module.to("cuda") if kind(make) == "cuda" else module


async def wait_idle(pool: af.Pool, seconds: float = 20) -> None:
    with anyio.fail_after(seconds):
        while pool.stats().busy or pool.stats().queued:
            await anyio.sleep(0.005)


async def wait_for(cond: Callable[[], bool], seconds: float = 20) -> None:
    with anyio.fail_after(seconds):
        while not cond():
            await anyio.sleep(0.005)


# ---------------------------------------------------------------- streaming
async def test_items_arrive_in_order_from_functions_methods_and_modules(
    make_pool: Callable[..., af.Pool],
) -> None:
    async with make_pool() as pool:
        got = [int(t[0]) async for t in pool.stream(M.count, 6)]
        assert got == list(range(6))
        counter = M.Counter()
        if kind(make_pool) == "cuda":
            counter = counter.to("cuda")  # a CUDA pool runs modules already on its device
        out = [y async for y in pool.stream(counter.generate, 3)]
        assert [i for i, _ in out] == [0, 1, 2]
        if kind(make_pool) == "process":
            assert {pid for _, pid in out} == set(pool.worker_pids())  # ran in the worker
        ys = [y async for y in pool.stream(counter, 2)]
        with torch.no_grad():
            want = counter.lin(torch.full((1, 2), 1.0, device=counter.lin.weight.device))
        torch.testing.assert_close(ys[1], want)
        stats = pool.stats()
        assert stats.completed == 3 and stats.busy == 0


async def test_large_items_travel_through_shared_memory(
    make_pool: Callable[..., af.Pool],
) -> None:
    async with make_pool() as pool:
        n = 256 * 1024  # 1 MiB of float32 per item: over the pipe's inline limit
        i = 0
        async for t in pool.stream(M.count, 5, size=n, buffer=2):
            assert t.shape == (n,) and bool((t == i).all())
            i += 1
        assert i == 5


async def test_a_slow_consumer_pauses_the_producer(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    async with make_pool() as pool:
        taken = 0
        async for _ in pool.stream(M.count, 30, log, buffer=3):
            taken += 1
            await anyio.sleep(0.02)
            made = sum(line.startswith("made") for line in M.entered(log))
            # the buffer, plus the item being handed over, plus the one being made (Ray
            # also holds up to `buffer` items in its own generator back-pressure)
            ahead = 3 + 2 + (3 if kind(make_pool) == "ray" else 0)
            assert made <= taken + ahead, (made, taken)
        assert taken == 30


@pytest.mark.parametrize("how", ["break", "cancel", "close"])
async def test_leaving_early_closes_the_generator_in_the_worker(
    make_pool: Callable[..., af.Pool], tmp_path: Path, how: str
) -> None:
    """Scenario 39: the generator's finally runs in the worker, the slot frees, the worker
    survives."""
    log = str(tmp_path / "log")
    async with make_pool() as pool:
        await pool.wait_ready()
        pids = pool.worker_pids()
        if how == "break":
            async for t in pool.stream(M.count, 10_000, log):
                if int(t[0]) == 3:
                    break
        elif how == "cancel":
            with anyio.move_on_after(0.3):
                async for _ in pool.stream(M.count_slowly, 10_000, 0.01, log):
                    pass
        else:
            s = pool.stream(M.count, 10_000, log)
            assert int((await s.__anext__())[0]) == 0
            s.close()
            with pytest.raises(StopAsyncIteration):
                await s.__anext__()
        await wait_for(lambda: "closed" in M.entered(log))
        await wait_idle(pool)
        assert pool.worker_pids() == pids
        assert pool.stats().cancelled == 1 and pool.stats().restarts == 0
        assert [int(t[0]) async for t in pool.stream(M.count, 2)] == [0, 1]  # worker serves on


async def test_an_exception_mid_stream_comes_after_the_items(
    make_pool: Callable[..., af.Pool],
) -> None:
    async with make_pool() as pool:
        got = []
        with pytest.raises(ValueError, match="failed at item 3"):
            async for t in pool.stream(M.count, 10, fail_at=3):
                got.append(int(t[0]))  # noqa: PERF401 - kept up to the exception
        assert got == [0, 1, 2]
        assert pool.stats().failed == 1


async def test_a_crash_mid_stream_gives_worker_crashed_after_the_items(
    make_pool: Callable[..., af.Pool],
) -> None:
    if kind(make_pool) != "process":
        pytest.skip("only a worker process can crash without taking the test with it")
    async with make_pool() as pool:
        got = []
        with pytest.raises(af.WorkerCrashedError, match="exited with code 3"):
            async for i in pool.stream(M.count_then_exit, 4):
                got.append(i)  # noqa: PERF401 - kept up to the exception
        assert got == [0, 1, 2, 3]


async def test_timeout_ends_the_stream_and_closes_the_generator(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    log = str(tmp_path / "log")
    async with make_pool() as pool:
        await pool.wait_ready()  # the timeout counts from submission
        got = []
        with pytest.raises(TimeoutError):
            async for i in pool.stream(M.count_slowly, 10_000, 0.01, log, timeout=0.3):
                got.append(i)  # noqa: PERF401 - kept up to the exception
        assert got and got == list(range(len(got)))
        await wait_for(lambda: "closed" in M.entered(log))
        await wait_idle(pool)
        assert pool.stats().restarts == 0
        assert pool.stats().failed == 1  # a timeout counts as a failed call


async def test_a_stream_holds_a_slot_like_a_call(make_pool: Callable[..., af.Pool]) -> None:
    async with make_pool(max_queued=1) as pool:
        s = pool.stream(M.count_slowly, 10_000, 0.01)
        await s.__anext__()
        assert pool.stats().busy == 1
        queued = pool.submit(M.Echo(), 1)
        assert pool.stats().queued == 1
        with pytest.raises(af.QueueFullError):
            pool.stream(M.count, 1)
        s.close()
        assert (await queued)[0] == (1,)


def test_sync_iteration_in_a_thread_and_af_stream(make_pool: Callable[..., af.Pool]) -> None:
    with make_pool() as pool:
        assert [int(t[0]) for t in pool.stream(M.count, 3)] == [0, 1, 2]
        with pool.stream(M.count, 100) as s:
            assert int(next(s)[0]) == 0
        with pytest.raises(ValueError, match="buffer must be an int >= 1, got 0"):
            pool.stream(M.count, 1, buffer=0)
        with pytest.raises(TypeError, match="fn must be a generator function"):
            pool.stream(3)  # type: ignore[arg-type]
        out: list[int] = []

        def consume() -> None:
            out.extend(int(t[0]) for t in af.stream(M.count, 4, pool=pool))

        t = threading.Thread(target=consume)
        t.start()
        t.join(30)
        assert out == [0, 1, 2, 3]
    with pytest.raises(af.PoolClosedError):
        pool.stream(M.count, 1)


async def test_mistakes_say_what_stream_needs(make_pool: Callable[..., af.Pool]) -> None:
    async with make_pool() as pool:
        with pytest.raises(TypeError, match=r"not_a_generator\(...\) returned int, not an iter"):
            async for _ in pool.stream(M.not_a_generator, 3):
                pass
        # A tensor is iterable (by rows), but streaming one is a mistake for forward/submit
        with pytest.raises(TypeError, match=r"Linear\(...\) returned a Tensor, not an iter"):
            async for _ in pool.stream(torch.nn.Linear(4, 2), torch.ones(3, 4)):
                pass
        if kind(make_pool) in ("thread", "process"):
            with pytest.raises(TypeError, match=r"forward returned a generator: run it with"):
                await pool.forward(M.Counter(), 2)
        if kind(make_pool) == "process":
            with pytest.raises(af.SerializationError, match="the function .* top level"):
                pool.stream(lambda: iter([1]))
        assert (await pool.forward(M.Echo(), 1))[0] == (1,)  # the worker serves on


# ---------------------------------------------------------------- cooperative cancellation
@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_a_running_forward_stops_at_its_next_block(
    make_pool: Callable[..., af.Pool], tmp_path: Path, how: str
) -> None:
    """Scenario 40: a cancelled or timed-out pass stops at its next block boundary; the
    worker, its pid and its weights survive; nothing is killed."""
    if kind(make_pool) == "ray":
        pytest.skip("a running Ray actor task cannot be interrupted: the actor is killed")
    log = str(tmp_path / "log")
    model = placed(make_pool, M.Blocks(24, 0.02, log))
    x = torch.randn(1, 8)
    async with make_pool(cancel_grace=30) as pool:
        await pool.forward(model, x)  # loads it
        pids = pool.worker_pids()
        os.remove(log)
        if how == "cancel":
            fut = pool.submit(model, x)
            await wait_for(lambda: len(M.entered(log)) >= 5)
            fut.cancel()
        else:
            with pytest.raises(TimeoutError):
                await pool.forward(model, x, timeout=0.15)
        entered_at_cancel = len(M.entered(log))
        await wait_idle(pool)
        ran = len(M.entered(log))
        assert ran <= entered_at_cancel + 2, (entered_at_cancel, ran)  # stopped within 2 blocks
        assert ran < 24
        stats = pool.stats()
        assert stats.restarts == 0 and stats.overran == 0
        assert pool.worker_pids() == pids
        assert (await pool.forward(M.Echo(), 5))[0] == (5,)


async def test_check_cancelled_stops_a_loop_of_your_own(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    if kind(make_pool) == "ray":
        pytest.skip("a running Ray actor task cannot be interrupted: the actor is killed")
    log = str(tmp_path / "log")
    async with make_pool(cancel_grace=30) as pool:
        await pool.wait_ready()
        fut = pool.submit(M.Looping(500, 0.01, log), torch.zeros(1))
        await wait_for(lambda: len(M.entered(log)) >= 3)
        fut.cancel()
        await wait_idle(pool)
        assert len(M.entered(log)) < 500
        assert pool.stats().restarts == 0 and pool.stats().overran == 0
    af.check_cancelled()  # outside a worker: nothing to stop


async def test_a_pass_without_blocks_overruns_its_grace(make_pool: Callable[..., af.Pool]) -> None:
    """No boundary within the grace period: a process is killed and replaced, a thread keeps
    its slot and the pool reports the overrun."""
    if kind(make_pool) == "ray":
        pytest.skip("RayPool has no cancel_grace: a Ray forward pass has no block check")
    async with make_pool(cancel_grace=0.2) as pool:
        await pool.wait_ready()  # the timeout counts from submission
        with pytest.raises(TimeoutError):
            await pool.forward(M.Sleep(1.5), None, timeout=0.1)
        await wait_for(lambda: pool.stats().overran == 1)
        await wait_idle(pool)
        if kind(make_pool) == "process":
            assert pool.stats().restarts == 1
        else:
            assert pool.stats().restarts == 0


async def test_cancel_checks_off_lets_the_pass_finish(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    if kind(make_pool) == "ray":
        pytest.skip("RayPool has no cancel_checks: a Ray forward pass has no block check")
    log = str(tmp_path / "log")
    model = placed(make_pool, M.Blocks(10, 0.01, log))
    async with make_pool(cancel_checks=False, cancel_grace=30) as pool:
        await pool.wait_ready()
        with pytest.raises(TimeoutError):
            await pool.forward(model, torch.zeros(1, 8), timeout=0.03)
        await wait_idle(pool)
        assert len(M.entered(log)) == 10
    assert type(model.blocks) is torch.nn.ModuleList


async def test_run_parallel_stops_the_sibling_of_a_failed_call(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    if kind(make_pool) == "ray":
        pytest.skip("a running Ray actor task cannot be interrupted")
    log = str(tmp_path / "log")
    slow = placed(make_pool, M.Blocks(24, 0.02, log))
    async with make_pool(workers=2, cancel_grace=30) as pool:
        await pool.run_parallel(af.call(slow, torch.zeros(1, 8)), af.call(M.Echo(), 0))
        os.remove(log)
        with pytest.raises(ValueError, match="boom"):
            await pool.run_parallel(
                af.call(slow, torch.zeros(1, 8)), af.call(M.Boom(), torch.zeros(2))
            )
        await wait_idle(pool)
        assert len(M.entered(log)) < 24
        assert pool.stats().restarts == 0


def test_stacks_check_while_the_pool_runs_them_and_are_given_back() -> None:
    model = M.Blocks(3)
    assert stacks(model) == [model.blocks]
    assert stacks(M.Tiny()) == []  # no stack: nothing changes, nothing to pay
    flat = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert stacks(flat) == []  # leaves only: the checks would cost more than they give
    flat2 = torch.nn.Sequential(torch.nn.Linear(2, 2))
    outer = torch.nn.Sequential(flat, flat2)  # blocks in a stack: every stack checks
    assert stacks(outer) == [outer, flat, flat2]
    with af.ThreadPool(1) as pool:
        pool.submit(model, torch.zeros(1, 8)).result(30)
        assert type(model.blocks) is not torch.nn.ModuleList
        assert isinstance(model.blocks, torch.nn.ModuleList)
        assert isinstance(model.blocks[:2], type(model.blocks))  # a slice keeps checking
        assert not any(m._forward_pre_hooks for m in model.modules())  # no hooks: fast paths
        with torch.no_grad():
            model(torch.zeros(1, 8))  # outside the pool the checks do nothing
    assert type(model.blocks) is torch.nn.ModuleList
