"""The module-level API: forward, run_parallel, call, AsyncModule, default pool, bad input."""

from __future__ import annotations

import asyncio
import inspect
import time

import anyio
import pytest
import torch

import aioforward as af
from aioforward import _api

from .models import Boom, Gate, Tiny, mlp

pytestmark = pytest.mark.anyio


def test_public_names_are_exactly_all() -> None:
    public = {n for n in dir(af) if not n.startswith(("_", "@"))}  # "@": pytest rewriting
    submodules = {"batching", "bench", "errors", "metrics", "monitor", "pools", "testing"}
    assert public - submodules == set(af.__all__)
    for name in af.__all__:
        obj = getattr(af, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == "aioforward", name
            assert obj.__doc__, name
        if inspect.isfunction(obj):
            assert "::" in obj.__doc__ or "Example" in obj.__doc__, f"{name} has no example"


async def test_forward_equals_direct_call() -> None:
    m, x = Tiny(), torch.randn(3, 10)
    with torch.inference_mode():
        expected = m(x)
    async with af.ThreadPool(workers=1) as pool:
        y = await af.forward(m, x, pool=pool)
    torch.testing.assert_close(y, expected)


async def test_forward_uses_default_pool() -> None:
    m, x = Tiny(), torch.randn(2, 10)
    y = await af.forward(m, x)
    assert y.shape == (2, 5)
    assert af.default_pool().stats().completed == 1


async def test_set_default_pool_installs_and_returns_previous() -> None:
    async with af.ThreadPool(workers=1) as pool:
        af.set_default_pool(pool)
        try:
            assert af.default_pool() is pool
            await af.forward(Tiny(), torch.randn(1, 10))
            assert pool.stats().completed == 1
        finally:
            assert af.set_default_pool(None) is pool
    with pytest.raises(TypeError, match="pool must be"):
        af.set_default_pool("threads")  # type: ignore[arg-type]


async def test_run_parallel_shared_arguments_in_module_order() -> None:
    m1, m2, x = Tiny(), Tiny(), torch.randn(4, 10)
    async with af.ThreadPool(workers=2) as pool:
        y1, y2 = await af.run_parallel(m1, m2, x, pool=pool)
    with torch.inference_mode():
        torch.testing.assert_close(y1, m1(x))
        torch.testing.assert_close(y2, m2(x))


async def test_run_parallel_with_call_objects_and_kwargs() -> None:
    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor, *, k: float = 1.0) -> torch.Tensor:
            return x * k

    s = Scale()
    async with af.ThreadPool(workers=2) as pool:
        a, b = await pool.run_parallel(af.call(s, torch.ones(2)), af.call(s, torch.ones(2), k=3.0))
        (c,) = await pool.run_parallel(s, torch.ones(1), k=2.0)
    assert a.tolist() == [1.0, 1.0] and b.tolist() == [3.0, 3.0] and c.tolist() == [2.0]


async def test_run_parallel_first_failure_cancels_sibling_and_names_module() -> None:
    gate = Gate()
    async with af.ThreadPool(workers=2) as pool:
        with pytest.raises(ValueError, match="boom") as info:
            await pool.run_parallel(af.call(gate, torch.zeros(1)), af.call(Boom(), torch.zeros(2)))
        notes = getattr(info.value, "__notes__", [])
        assert any("module 1 (Boom)" in n for n in notes), notes
        gate.release.set()  # the sibling was running: its slot frees once it ends
    assert pool.stats().cancelled == 1


async def test_async_module_wraps_module() -> None:
    m = Tiny()
    async with af.ThreadPool(workers=1) as pool:
        am = af.AsyncModule(m, pool=pool)
        assert am.module is m
        y = await am(torch.randn(1, 10))
    assert y.shape == (1, 5)


async def test_nested_structures_come_back_unchanged() -> None:
    from .models import ModelOutput, Nested, Output, Point

    async with af.ThreadPool(workers=1) as pool:
        out, mo, plain = await pool.forward(
            Nested(), Point(torch.ones(2), "a"), {"ts": [torch.ones(1)]}, scale=2.0
        )
    assert isinstance(out, Output) and isinstance(mo, ModelOutput)
    assert out.logits.tolist() == [2.0, 2.0] and out.extra["label"] == "a"
    assert mo.n == 1 and plain == [None, 3, "s"]


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda: af.run_parallel(), TypeError, "at least one module"),
        (lambda: af.run_parallel(torch.ones(1), torch.ones(1)), TypeError, "Tensor"),
        (lambda: af.forward(torch.ones(1)), TypeError, "module must be a torch.nn.Module"),
        (lambda: af.forward(lambda x: x, 1), TypeError, "module must be"),
        (lambda: af.forward(Tiny(), torch.ones(1, 10), timeout=-1), ValueError, "timeout"),
        (lambda: af.run_parallel(af.call(Tiny()), Tiny()), TypeError, "every argument"),
    ],
    ids=["no-module", "tensor-as-module", "tensor-forward", "lambda", "negative-timeout", "mixed"],
)
async def test_bad_input_is_rejected_naming_the_argument(make, error, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=words):
        await make()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"workers": 0}, "workers must be an int >= 1, got 0"),
        ({"max_queued": -1}, "max_queued"),
        ({"workers": "2"}, r"workers must be an int >= 1, got '2' \(str\)"),
        ({"threads_per_worker": -1}, "threads_per_worker"),
    ],
)
def test_bad_pool_arguments(kwargs, words) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises((TypeError, ValueError), match=words):
        af.ThreadPool(**kwargs)


def test_call_rejects_non_module() -> None:
    with pytest.raises(TypeError, match="module must be"):
        af.call(torch.ones(1))  # type: ignore[arg-type]


async def test_loop_stays_free_while_heavy_forwards_run() -> None:
    """The promise itself: the loop keeps beating while two heavy passes run, and a
    direct call in the coroutine would have frozen it for the whole pass."""
    m1, m2, x = mlp(), mlp(), torch.randn(256, 1024)
    async with af.ThreadPool(workers=2) as pool:
        await pool.run_parallel(m1, m2, x)  # warm up
        async with af.LoopLagMonitor() as lag:
            for _ in range(5):
                await pool.run_parallel(m1, m2, x)
        compute = pool.stats().compute.p50
        direct = []
        async with af.LoopLagMonitor() as frozen:
            await anyio.sleep(0.005)
            for _ in range(3):
                t0 = time.perf_counter()
                with torch.inference_mode():
                    m1(x)
                direct.append(time.perf_counter() - t0)
                await anyio.sleep(0.005)
    # Relative bounds only, each against a duration measured in the same test: on a noisy
    # 2-core VM one beat can wait out a scheduler slice, but no beat waits for a whole pass,
    # as the direct calls below make them do.
    assert lag.stats().samples > 10
    assert lag.stats().p50 < compute / 10, (lag.stats(), compute)
    assert lag.stats().max < compute, (lag.stats(), compute)
    assert frozen.stats().max > 0.8 * min(direct), (frozen.stats(), direct)


def test_default_pool_is_a_thread_pool_and_recreated_after_close() -> None:
    p = af.default_pool()
    assert isinstance(p, af.ThreadPool)
    p.close()
    q = af.default_pool()
    assert q is not p and not q.closed
    assert _api._default_owned


async def test_forward_on_asyncio_accepts_wrap_future() -> None:
    import sniffio

    if sniffio.current_async_library() != "asyncio":
        pytest.skip("asyncio.wrap_future is asyncio-only")
    async with af.ThreadPool(workers=1) as pool:
        y = await asyncio.wrap_future(pool.submit(Tiny(), torch.ones(1, 10)))
        z = await asyncio.get_running_loop().run_in_executor(pool, sum, [1, 2])
    assert y.shape == (1, 5) and z == 3


def test_futures_completed_together_wake_the_loop_once() -> None:
    """Twenty awaited futures completed in a row from another thread, while the loop is busy,
    cost the loop one wake-up (one call_soon_threadsafe), and every awaiting task gets its
    own result."""
    import threading

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        futures: list[af.ForwardFuture[int]] = [af.ForwardFuture() for _ in range(20)]
        waiting = [asyncio.ensure_future(_await(f)) for f in futures]
        await asyncio.sleep(0.01)  # every task is parked on its future
        calls = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object) -> object:
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        done = threading.Event()

        def complete() -> None:
            for i, f in enumerate(futures):
                f.set_result(i)
            done.set()

        threading.Thread(target=complete).start()
        assert done.wait(10)  # the loop is blocked meanwhile: one drain covers all twenty
        results = await asyncio.gather(*waiting)
        assert calls == 1
        return results

    async def _await(f: af.ForwardFuture[int]) -> int:
        return await f

    assert asyncio.run(main()) == list(range(20))
