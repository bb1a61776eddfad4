"""Batcher: concurrent single samples coalesced into batched forward passes."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import anyio
import pytest
import torch
from torch import nn

import aioforward as af

from . import models as M
from .conftest import assert_pool_idle

pytestmark = pytest.mark.anyio


class Recorder(nn.Module):
    """Linear(4, 2) that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.lin(x) * scale


class Held(Recorder):
    """Recorder whose first call blocks until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        if not self.sizes:
            self.entered.set()
            self.release.wait(30)
        return super().forward(x, scale)


class Structured(nn.Module):
    def forward(self, inputs: dict[str, torch.Tensor], tag: str) -> tuple[Any, ...]:
        total = inputs["a"] + inputs["b"].sum(-1, keepdim=True)
        return M.Point(total, tag), {"n": inputs["a"].shape[0], "rows": total * 2}


class NoLeaves(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[()]:
        return ()


class WrongRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()  # one number for the whole batch


async def gather(batcher: af.Batcher, samples: list[Any], **kwargs: Any) -> list[Any]:
    out: list[Any] = [None] * len(samples)

    async def one(i: int) -> None:
        out[i] = await batcher(samples[i], **kwargs)

    async with anyio.create_task_group() as tg:
        for i in range(len(samples)):
            tg.start_soon(one, i)
    return out


async def test_concurrent_samples_share_batches_and_match_direct_calls() -> None:
    m = Recorder()
    xs = [torch.randn(4) for _ in range(10)]
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(m, pool, max_batch_size=4, max_delay=0.5) as batcher,
    ):
        ys = await gather(batcher, xs)
        s = batcher.stats()
    with torch.inference_mode():
        for x, y in zip(xs, ys, strict=True):
            torch.testing.assert_close(y, m.lin(x))
    # 10 samples at once: two full batches at once, the last two when their delay ran out
    assert sorted(m.sizes) == [2, 4, 4]
    assert (s.batches, s.samples, s.largest, s.pending) == (3, 10, 4, 0)
    assert_pool_idle(pool)


async def test_batch_size_follows_load() -> None:
    """No delay by default: a lone sample runs at once; samples arriving while the only
    slot computes form the next batch together."""
    m = Held()
    async with af.ThreadPool(workers=1) as pool, af.Batcher(m, pool) as batcher:
        first = batcher.submit(torch.ones(4))
        await anyio.to_thread.run_sync(m.entered.wait, 10)
        rest = [batcher.submit(torch.ones(4)) for _ in range(5)]
        assert batcher.stats().pending == 5
        m.release.set()
        await first
        for f in rest:
            await f
    assert m.sizes == [1, 5]


async def test_nested_inputs_and_outputs_are_split_per_sample() -> None:
    samples = [{"a": torch.full((1,), float(i)), "b": torch.ones(3)} for i in range(3)]
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(Structured(), pool, max_delay=0.05) as batcher,
    ):
        outs = await gather(batcher, samples, tag="t")
    for i, (point, extra) in enumerate(outs):
        assert isinstance(point, M.Point) and point.label == "t"
        assert point.x.tolist() == [i + 3.0]
        assert extra["n"] == 3  # a non-tensor output reaches every caller as it is
        assert extra["rows"].tolist() == [2 * (i + 3.0)]


async def test_samples_that_cannot_stack_go_in_separate_batches() -> None:
    m = Recorder()
    async with af.ThreadPool(workers=1) as pool, af.Batcher(m, pool, max_delay=0.05) as batcher:
        a, b, c = await gather(batcher, [torch.ones(4), torch.ones(2, 4), torch.ones(4)])
        scaled = await batcher(torch.ones(4), scale=2.0)
    assert a.shape == c.shape == (2,) and b.shape == (2, 2)
    assert sorted(m.sizes) == [1, 1, 2]  # the 2x4 sample ran alone; scale=2.0 too
    torch.testing.assert_close(scaled, 2 * a)


async def test_module_error_reaches_every_caller_of_the_batch() -> None:
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(M.Boom(), pool, max_delay=0.05) as batcher,
    ):
        futures = [batcher.submit(torch.zeros(2)), batcher.submit(torch.zeros(2))]
        for f in futures:  # one batch of two: each caller sees the batched call's error
            with pytest.raises(ValueError, match=r"boom: \(2, 2\)"):
                await f


async def test_a_batch_of_awaiting_callers_and_submitted_futures_ends_them_all() -> None:
    """Rows and errors reach a batch that mixes ``await batcher(x)`` (this loop's futures,
    set in one call of the loop) and ``batcher.submit(x)`` (ForwardFutures)."""
    m = Recorder()
    async with af.ThreadPool(workers=1) as pool, af.Batcher(m, pool, max_delay=0.2) as batcher:
        submitted = batcher.submit(torch.full((4,), 1.0))
        awaited, also = await gather(batcher, [torch.full((4,), 2.0), torch.full((4,), 3.0)])
        with torch.inference_mode():
            for k, row in ((1.0, await submitted), (2.0, awaited), (3.0, also)):
                torch.testing.assert_close(row, m.lin(torch.full((4,), k)))
    assert m.sizes == [3]
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(M.Boom(), pool, max_delay=0.2) as batcher,
    ):
        submitted = batcher.submit(torch.zeros(2))
        with pytest.raises(ValueError, match=r"boom: \(2, 2\)"):
            await batcher(torch.zeros(2))
        with pytest.raises(ValueError, match=r"boom: \(2, 2\)"):
            await submitted


async def test_output_without_a_row_per_sample_is_a_clear_error() -> None:
    async with af.ThreadPool(workers=1) as pool, af.Batcher(WrongRows(), pool) as batcher:
        with pytest.raises(ValueError, match=r"shape \(\) for a batch of 1 samples"):
            await batcher(torch.ones(3))


async def test_output_with_no_tensor_reaches_each_caller() -> None:
    """A module that returns an empty structure: each caller gets it, none waits for ever."""
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(NoLeaves(), pool, max_delay=0.05) as batcher,
    ):
        fut = batcher.submit(torch.ones(3))
        with anyio.fail_after(10):
            assert await batcher(torch.ones(3)) == ()
            assert await fut == ()


async def test_a_batch_the_pool_cancels_fails_its_callers_with_an_exception() -> None:
    """``shutdown(cancel_futures=True)`` cancels a batch queued in the pool: every caller gets
    ``concurrent.futures.CancelledError`` (an Exception), on each event loop, as awaiting a
    cancelled pool call does; never ``asyncio.CancelledError``, which would tell the caller's
    task that it was cancelled itself, so that a task group would drop the failure."""
    m = Held()
    pool = af.ThreadPool(workers=1)
    # one batch in flight: the two callers' samples wait for each other, then run as a full
    # batch, which the pool queues behind the held one
    async with af.Batcher(m, pool, max_batch_size=2, max_in_flight=1) as batcher:
        first = batcher.submit(torch.ones(4))
        try:
            await anyio.to_thread.run_sync(m.entered.wait, 10)  # the only worker is held
            errors: list[BaseException] = []

            async def caller() -> None:
                try:
                    await batcher(torch.ones(4))
                except Exception as exc:
                    errors.append(exc)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(caller)
                    tg.start_soon(caller)
                    while pool.stats().queued == 0:
                        await anyio.sleep(0.01)
                    pool.shutdown(wait=False, cancel_futures=True)
            assert [type(e) for e in errors] == [concurrent.futures.CancelledError] * 2
        finally:
            m.release.set()
            await first
            await pool.aclose()


async def test_a_closed_default_pool_fails_callers_and_a_new_one_serves_them() -> None:
    """A Batcher on the default pool, while the default pool installed by the user is closed:
    its callers get PoolClosedError (the flusher thread survives it), and once another default
    pool is installed they are served again."""
    m = Recorder()
    first, second = af.ThreadPool(workers=1), af.ThreadPool(workers=1)
    try:
        af.set_default_pool(first)
        async with af.Batcher(m) as batcher:
            with anyio.fail_after(10):
                await batcher(torch.ones(4))
                await first.aclose()
                with pytest.raises(af.PoolClosedError, match="has been closed"):
                    await batcher(torch.ones(4))
                af.set_default_pool(second)
                assert (await batcher(torch.ones(4))).shape == (2,)
    finally:
        af.set_default_pool(None)
        await second.aclose()


async def test_cancelled_sample_leaves_its_batch_and_timeout_is_builtin() -> None:
    m = Recorder()
    async with af.ThreadPool(workers=1) as pool, af.Batcher(m, pool, max_delay=0.2) as batcher:
        kept = batcher.submit(torch.ones(4))
        dropped = batcher.submit(torch.ones(4))
        assert dropped.cancel()
        done, _ = concurrent.futures.wait([dropped], timeout=5)  # at once, as an executor's
        assert done == {dropped}
        await kept
        with pytest.raises(TimeoutError):
            await batcher(torch.ones(4), timeout=0.01)  # leaves before its batch runs
        await anyio.sleep(0.3)
    assert m.sizes == [1]  # neither the cancelled nor the timed-out sample ran
    assert batcher.stats().samples == 1


async def test_submit_from_threads_and_close_flushes_pending() -> None:
    m = Recorder()
    pool = af.ThreadPool(workers=1)
    batcher = af.Batcher(m, pool, max_batch_size=64, max_delay=30)
    futures: list[concurrent.futures.Future[Any]] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(5):
            f = batcher.submit(torch.ones(4))
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.stats().pending == 20
    await batcher.aclose()  # runs the 20 waiting samples at once instead of after 30 s
    results = [f.result(timeout=10) for f in futures]
    assert len(results) == 20 and m.sizes == [20]
    with pytest.raises(af.PoolClosedError, match="closed"):
        batcher.submit(torch.ones(4))
    await pool.aclose()


async def test_batcher_on_a_process_pool() -> None:
    m = M.Tiny()
    xs = [torch.randn(10) for _ in range(6)]
    async with (
        af.ProcessPool(workers=1) as pool,
        af.Batcher(m, pool, max_batch_size=6, max_delay=1.0) as batcher,
    ):
        ys = await gather(batcher, xs)
        assert pool.stats().completed == 1  # one forward pass for six callers
    with torch.inference_mode():
        for x, y in zip(xs, ys, strict=True):
            torch.testing.assert_close(y, m(x))


async def test_batcher_uses_the_default_pool() -> None:
    m = Recorder()
    async with af.Batcher(m) as batcher:
        y = await batcher(torch.ones(4))
    assert y.shape == (2,) and m.sizes == [1]


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be an int >= 1, got 0"),
        ({"max_batch_size": 2.5}, TypeError, "max_batch_size must be an int >= 1, got 2.5"),
        ({"max_delay": -1}, ValueError, "max_delay must be a number >= 0, got -1"),
        ({"max_delay": "1"}, TypeError, "max_delay must be a number >= 0, got '1'"),
        ({"pool": "threads"}, TypeError, "pool must be"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], exc: type, words: str) -> None:
    with pytest.raises(exc, match=words):
        af.Batcher(Recorder(), **kwargs)


def test_module_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="module must be"):
        af.Batcher(torch.ones(1))  # type: ignore[arg-type]


async def test_batch_left_by_all_its_awaiting_callers_is_cancelled_in_the_pool() -> None:
    m = Held()
    async with (
        af.ThreadPool(workers=1) as pool,
        af.Batcher(m, pool, max_batch_size=2, max_in_flight=2) as batcher,
    ):
        first = batcher.submit(torch.ones(4))
        await anyio.to_thread.run_sync(m.entered.wait, 10)  # the only worker is held
        timed_out: list[bool] = []

        async def caller() -> None:
            try:
                await batcher(torch.ones(4), timeout=0.2)
            except TimeoutError:
                timed_out.append(True)

        async with anyio.create_task_group() as tg:  # a full batch, queued in the pool
            for _ in range(2):
                tg.start_soon(caller)
        assert timed_out == [True, True]
        m.release.set()
        await first
        await anyio.sleep(0.2)
        assert_pool_idle(pool)
    assert m.sizes == [1]  # the batch both callers left never ran
    assert pool.stats().completed == 1


def test_rows_reach_callers_on_several_event_loops() -> None:
    """One Batcher, callers on two asyncio loops in two threads: a batch holding samples of
    both hands each loop its own rows."""
    m = Recorder()
    results: dict[int, list[torch.Tensor]] = {}
    with af.ThreadPool(workers=1) as pool, af.Batcher(m, pool, max_delay=0.3) as batcher:
        barrier = threading.Barrier(2)

        def client(k: int) -> None:
            async def main() -> None:
                barrier.wait(10)
                results[k] = [await batcher(torch.full((4,), float(k)))]

            anyio.run(main)

        threads = [threading.Thread(target=client, args=(k,)) for k in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert m.sizes == [2]  # one batch for both loops
    with torch.inference_mode():
        for k in (1, 2):
            torch.testing.assert_close(results[k][0], m.lin(torch.full((4,), float(k))))


def test_flatten_keeps_every_container_type() -> None:
    import collections
    import dataclasses

    from aioforward._tree import flatten, unflatten

    @dataclasses.dataclass
    class Box:
        t: torch.Tensor
        n: int

    class Items(list[Any]):
        pass

    t = torch.ones(2)
    p = nn.Parameter(torch.zeros(1))
    obj = (
        collections.OrderedDict(a=t),
        M.Point(t, "tag"),
        Items([t, 1]),
        Box(t, 3),
        {"p": p, "none": None},
        [1.5, "s"],
    )
    leaves, spec = flatten(obj)
    assert len(leaves) == 11 and leaves[2] == "tag" and leaves[7] is p
    back = unflatten(spec, iter(leaves))
    assert type(back[0]) is collections.OrderedDict and type(back[1]) is M.Point
    assert type(back[2]) is Items and back[2][1] == 1
    assert type(back[3]) is Box and back[3].n == 3
    assert back[4]["p"] is p and back[4]["none"] is None and back[5] == [1.5, "s"]
