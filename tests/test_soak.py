"""Soak (issue 7, RELIABILITY.md scenario 30): thousands of calls with 5% crashes, 5% timeouts
and 5% cancellations. Every call ends with a result or a typed error; after close the
process's descriptors, threads, child processes and /dev/shm entries are back where they
were (the autouse ``no_leaks`` fixture, plus an explicit check here), and the parent's RSS
stays within 10% of its value after warm-up."""

from __future__ import annotations

import gc
import os
import random
import threading
from typing import Any

import anyio
import psutil
import pytest
import torch

import aioforward as af

from . import models as M
from .conftest import _in_ray_node, assert_pool_idle, open_fds

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    # minutes each: one loop here; scenario 30 runs on all three in test_process.py
    pytest.mark.parametrize("anyio_backend", ["asyncio"]),
]


def snapshot(ray: bool = False) -> tuple[set[str], set[str], set[int], set[str]]:
    """Descriptors (less Ray's gRPC sockets with ``ray``: a worker's pipe is a socket too),
    aioforward threads, child processes (less Ray's), aiofwd /dev/shm entries."""
    fds = {f"{fd}->{t}" for fd, t in open_fds().items() if not (ray and t.startswith("socket:"))}
    threads = {t.name for t in threading.enumerate() if t.name.startswith("aioforward")}
    # Ray's raylet starts and keeps worker processes of its own, as it sees fit
    children = {p.pid for p in psutil.Process().children(recursive=True) if not _in_ray_node(p)}
    shm = {n for n in os.listdir("/dev/shm") if n.startswith("aiofwd")}
    return fds, threads, children, shm


async def soak(pool: af.Pool, calls: int, wave: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    big = torch.ones(200_000)

    async def one(i: int) -> None:
        r = rng.random()
        try:
            if r < 0.05:
                await pool.forward(M.Exit(3))
                outcome = "crash did not crash"
            elif r < 0.10:
                await pool.forward(M.Sleep(5), timeout=0.05)
                outcome = "timeout did not time out"
            elif r < 0.15:
                with anyio.move_on_after(0.02):
                    await pool.forward(M.Sleep(0.1))
                outcome = "cancelled"
            elif r < 0.25:
                (y,), _ = await pool.forward(M.Echo(), big * i)
                assert y[-1].item() == i
                outcome = "ok"
            else:
                assert (await pool.forward(M.Echo(), i))[0] == (i,)
                outcome = "ok"
        except (TimeoutError, af.WorkerCrashedError, af.WorkerStartError) as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    me = psutil.Process()
    rss: list[int] = []
    with anyio.fail_after(900):
        for start in range(0, calls, wave):
            async with anyio.create_task_group() as tg:
                for i in range(start, min(calls, start + wave)):
                    tg.start_soon(one, i)
            gc.collect()
            rss.append(me.memory_info().rss)
        while pool.stats().busy:
            await anyio.sleep(0.05)
    assert sum(outcomes.values()) == calls, outcomes
    assert set(outcomes) <= {"ok", "cancelled", "TimeoutError", "WorkerCrashedError"}, outcomes
    warm = rss[1]
    assert max(rss[2:]) < warm * 1.10, rss  # within 10% of the value after warm-up
    assert_pool_idle(pool)
    return outcomes


async def test_soak_process_pool_2000_calls() -> None:
    before = snapshot()
    with af.ProcessPool(workers=2) as pool:
        await pool.wait_ready(60)
        outcomes = await soak(pool, 2000, 100, seed=7)
    assert outcomes["WorkerCrashedError"] > 50 and outcomes["TimeoutError"] > 50, outcomes
    assert snapshot() == before


async def test_soak_ray_pool(local_ray: Any) -> None:
    before = snapshot(ray=True)
    with af.RayPool(workers=2, num_cpus_per_worker=0.5) as pool:
        await pool.wait_ready(120)
        # Ray replaces an actor in about a second: 1,000 calls keep the run near a minute
        outcomes = await soak(pool, 1000, 50, seed=8)
    assert local_ray.is_initialized()  # a pool that joined a running Ray leaves it running
    assert outcomes["WorkerCrashedError"] > 5 and outcomes["TimeoutError"] > 5, outcomes
    after = snapshot(ray=True)
    assert after[1:] == before[1:], (after, before)
    ours = {fd for fd in after[0] - before[0] if "/ray/" not in fd}
    assert not ours, ours  # Ray's log files come and go; none of ours remain
