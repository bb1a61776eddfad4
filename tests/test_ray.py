"""RayPool against a real local Ray (``ray.init()`` on this machine), on the three loops."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING

import anyio
import psutil
import pytest
import torch

import aioforward as af

from . import models as M
from .conftest import LONG_LIVED_THREADS

if TYPE_CHECKING:
    from collections.abc import Iterator

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'aioforward[ray]'")

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pool() -> Iterator[af.RayPool]:
    """One local Ray and two actors for the whole module (a Ray start takes seconds)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"env_vars": {"PYTHONPATH": root}}  # the actors import tests.models
    LONG_LIVED_THREADS.add("aioforward-ray-shared-timer")  # its deadline timer, once started
    init = {"num_cpus": 2, "runtime_env": env}
    with af.RayPool(workers=2, init_kwargs=init, name="aioforward-ray-shared") as p:
        with anyio.from_thread.start_blocking_portal() as portal:
            portal.call(p.wait_ready, 120)
        yield p
    assert not ray.is_initialized()  # the pool started Ray, so it shut it down


async def test_results_equal_direct_calls_and_structures(pool: af.RayPool) -> None:
    m, x = M.Tiny(), torch.randn(3, 10)
    with torch.inference_mode():
        torch.testing.assert_close(await pool.forward(m, x), m(x))
    y1, y2 = await pool.run_parallel(m, m, x)
    torch.testing.assert_close(y1, y2)
    out, mo, plain = await pool.forward(M.Nested(), M.Point(torch.ones(2), "a"), {"ts": []})
    assert isinstance(out, M.Output) and isinstance(mo, M.ModelOutput) and plain[1] == 3
    spec = af.ModuleSpec(M.build_tiny, 1)
    assert (await pool.forward(spec, torch.zeros(1, 10))).shape == (1, 5)
    assert pool.stats().compute.p50 > 0


async def test_a_modules_first_awaited_call_puts_it_off_the_event_loop(
    pool: af.RayPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray.put`` of a module serialises its weights: the awaited API does it in a worker
    thread, not in the event loop's."""
    put_in: list[str] = []
    put = ray.put

    def record(*args: object, **kwargs: object) -> object:
        put_in.append(threading.current_thread().name)
        return put(*args, **kwargs)

    monkeypatch.setattr(ray, "put", record)
    me, x = threading.current_thread().name, torch.zeros(1, 10)
    await pool.forward(M.Tiny(), x)
    await pool.run_parallel(M.Tiny(), M.Tiny(), x)
    assert len(put_in) == 3 and me not in put_in, put_in


async def test_exception_keeps_type_with_actor_traceback(pool: af.RayPool) -> None:
    with pytest.raises(ValueError, match=r"boom: \(2,\)") as info:
        await pool.forward(M.Boom(), torch.zeros(2))
    assert isinstance(info.value.__cause__, af.RemoteTraceback)
    assert "in forward" in str(info.value.__cause__)
    assert (await pool.forward(M.Echo(), 1))[0] == (1,)


async def test_killed_actor_fails_only_its_call_and_is_replaced(pool: af.RayPool) -> None:
    restarts = pool.stats().restarts
    fut = pool.submit(M.Sleep(30), None)
    with anyio.fail_after(30):
        while not fut.running():
            await anyio.sleep(0.01)
        pid = int(await pool.forward(M.Sleep(0.0), None))  # the other actor answers
    victim = next(p for p in pool.worker_pids() if p != pid)
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(af.WorkerCrashedError, match="died") as info:
        await fut
    assert info.value.module == "Sleep"
    assert pool.stats().restarts == restarts + 1
    with anyio.fail_after(60):
        for _ in range(4):  # both actors serve again, the new one included
            assert (await pool.forward(M.Echo(), 2))[0] == (2,)


async def test_timeout_kills_and_replaces_the_actor(pool: af.RayPool) -> None:
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await pool.forward(M.Sleep(60), None, timeout=0.5)
    assert time.monotonic() - t0 < 0.5 + 0.5
    with anyio.fail_after(60):
        while pool.stats().busy:
            await anyio.sleep(0.05)
        assert (await pool.forward(M.Echo(), 3))[0] == (3,)


async def test_reload_ships_changed_weights(pool: af.RayPool) -> None:
    m, x = M.Tiny(), torch.ones(1, 10)
    before = await pool.forward(m, x)
    with torch.no_grad():
        m.b.bias.add_(1.0)
    assert torch.equal(await pool.forward(m, x), before)  # actors keep what they were sent
    pool.reload(m)
    for _ in range(2):  # every actor forgot the old copy
        torch.testing.assert_close(await pool.forward(m, x), before + 1.0)


async def test_bad_arguments_name_the_argument(pool: af.RayPool) -> None:
    with pytest.raises(ValueError, match="workers must be an int >= 1, got 0"):
        af.RayPool(workers=0)
    with pytest.raises(ValueError, match="num_cpus_per_worker must be a number >= 0, got -1"):
        af.RayPool(num_cpus_per_worker=-1)
    with pytest.raises(ValueError, match="needs 10 CPUs but the Ray cluster has 2"):
        af.RayPool(workers=10)  # Ray would wait forever to place them
    assert ray.is_initialized()  # a refused pool leaves the running Ray alone


async def test_close_kills_the_actors(pool: af.RayPool) -> None:
    with af.RayPool(workers=1, num_cpus_per_worker=0) as own:
        await own.wait_ready(60)
        pids = own.worker_pids()
        assert len(pids) == 1
    with anyio.fail_after(20):
        while psutil.pid_exists(pids[0]) and psutil.Process(pids[0]).status() != "zombie":
            await anyio.sleep(0.1)
    with pytest.raises(af.PoolClosedError):
        own.submit(M.Echo(), 1)
