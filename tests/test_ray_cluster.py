"""RayPool past one node: a Ray cluster of several raylets on this machine
(``ray.cluster_utils.Cluster``), nodes added and removed while calls run, on the three loops.

One cluster serves the module: a head that hosts no actors (``num_cpus=0``) and two
2-CPU nodes shared by the placement tests. Each node-loss test adds nodes of its own,
carrying a custom resource only its pool asks for, so what it removes touches no other
test's actors, and removes them again.
"""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
import pytest
import torch

import aioforward as af

from . import models as M

if TYPE_CHECKING:
    from collections.abc import Iterator

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'aioforward[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402 - after the skip when Ray is missing

from aioforward.pools.ray import ZERO_COPY_BYTES, _pack, _unpack  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds a lost actor's replacement may take to run again on a surviving node (Ray notices a
# removed node at once; an actor start is 1-3 s here, more while two cores run a cluster).
RECOVER_S = 30
START_TIMEOUT = 6.0  # the node-loss pools' start_timeout: a replacement that cannot be placed


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs and two nodes of 2 CPUs each, joined by this process."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            c.add_node(num_cpus=2)
        c.wait_for_nodes()
        # the actors import tests.models
        ray.init(
            address=c.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": ROOT}}
        )
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _node_ids(c: Cluster) -> set[str]:
    return {n.node_id for n in c.worker_nodes}


async def _wait_for(what: str, cond: Any, seconds: float) -> float:
    """Poll ``cond()`` until true; return the seconds it took, fail after ``seconds``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > seconds:
            pytest.fail(f"{what}: not within {seconds} s")
        await anyio.sleep(0.05)
    return time.monotonic() - t0


class TestPlacement:
    @pytest.mark.anyio
    async def test_spread_puts_one_actor_on_each_node_and_reload_reaches_both(
        self, cluster: Cluster
    ) -> None:
        async with af.RayPool(
            workers=2, address=cluster.address, scheduling_strategy="SPREAD"
        ) as pool:
            await pool.wait_ready(60)
            where = pool.worker_nodes()
            assert set(where) == _node_ids(cluster)
            assert sorted(len(p) for p in where.values()) == [1, 1]
            pids = await pool.run_parallel(M.Pid(), M.Pid())  # both idle: one call each
            assert sorted(pids) == sorted(p for ps in where.values() for p in ps)

            x = torch.ones(1, 10)
            spec = af.ModuleSpec(M.build_tiny, 1)  # built on every node
            y1, y2 = await pool.run_parallel(spec, spec, x)
            want = M.build_tiny(1)(x).detach()
            torch.testing.assert_close(y1, want)
            torch.testing.assert_close(y2, want)

            m = M.Tiny()  # one module shipped to every node
            before = await pool.run_parallel(m, m, x)
            with torch.no_grad():
                m.b.bias.add_(1.0)
            pool.reload(m)
            after = await pool.run_parallel(m, m, x)
            for b, a in zip(before, after, strict=True):
                torch.testing.assert_close(a, b + 1.0)

    @pytest.mark.anyio
    async def test_large_tensors_cross_nodes_and_come_back_writable(self, cluster: Cluster) -> None:
        big = torch.randn(2048, 1024)  # 8 MiB: a view crosses, not a pickled copy
        half = torch.randn(1 << 20, dtype=torch.float32).to(torch.bfloat16)  # numpy has no bf16
        strided = torch.randn(512, 1024).t()  # not contiguous: pickled the ordinary way
        small = torch.arange(5)
        async with af.RayPool(workers=1, address=cluster.address) as pool:
            args, kwargs = await pool.forward(M.Echo(), big, {"h": [half]}, s=strided, n=small)
        torch.testing.assert_close(args[0], big)
        assert args[1]["h"][0].dtype is torch.bfloat16
        torch.testing.assert_close(args[1]["h"][0], half)
        torch.testing.assert_close(kwargs["s"], strided)
        assert torch.equal(kwargs["n"], small)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            args[0].add_(1.0)  # the result is the caller's own memory
        torch.testing.assert_close(args[0], big + 1.0)

    @pytest.mark.anyio
    async def test_refuses_what_the_nodes_cannot_hold(self, cluster: Cluster) -> None:
        with pytest.raises(ValueError, match="needs 5 CPUs but the Ray cluster has 4"):
            af.RayPool(workers=5)
        with pytest.raises(ValueError, match=r"CPU 3 each: the cluster's nodes can hold only 0"):
            af.RayPool(workers=1, num_cpus_per_worker=3)  # 4 CPUs in all, 2 per node
        with pytest.raises(ValueError, match=r"can hold only 4 of them"):
            af.RayPool(workers=5, num_cpus_per_worker=0.75)  # 2 per node: 3.75 <= 4 CPUs
        with pytest.raises(ValueError, match=r"resources_per_worker\['tpu'\]=1 needs 1 tpus"):
            af.RayPool(workers=1, resources_per_worker={"tpu": 1})
        with pytest.raises(ValueError, match="scheduling_strategy must be 'DEFAULT', 'SPREAD'"):
            af.RayPool(scheduling_strategy="PACK")
        with pytest.raises(ValueError, match="start_timeout must be a number > 0, got 0"):
            af.RayPool(start_timeout=0)
        with pytest.raises(ValueError, match="custom resource names .* got 'CPU'"):
            af.RayPool(resources_per_worker={"CPU": 1})
        assert ray.is_initialized()  # refusals leave the joined cluster alone


class TestNodeLoss:
    @pytest.mark.anyio
    @pytest.mark.timeout(150)
    async def test_lost_node_fails_its_calls_only_then_no_room_then_a_new_node(
        self, cluster: Cluster
    ) -> None:
        tag = f"loss-{uuid.uuid4().hex[:8]}"  # a resource only this test's nodes have

        def add() -> Any:  # blocks the loop a second: Ray starts nodes in the main thread only
            return cluster.add_node(num_cpus=2, resources={tag: 2})

        nodes = [add() for _ in range(2)]
        try:
            async with af.RayPool(
                workers=2,
                address=cluster.address,
                resources_per_worker={tag: 1},
                scheduling_strategy="SPREAD",
                start_timeout=START_TIMEOUT,
            ) as pool:
                await pool.wait_ready(60)
                where = pool.worker_nodes()
                assert set(where) == {n.node_id for n in nodes}
                lost, kept = nodes
                (victim,) = where[lost.node_id]
                (survivor,) = where[kept.node_id]
                restarts = pool.stats().restarts

                # 1. Remove a node while both actors run a call.
                futs = [pool.submit(M.Sleep(4.0), None) for _ in range(2)]
                await _wait_for("both calls running", lambda: all(f.running() for f in futs), 30)
                cluster.remove_node(lost)
                nodes.remove(lost)
                t_lost = time.monotonic()
                outcomes: list[Any] = []
                for f in futs:
                    try:
                        outcomes.append(int(await f))
                    except af.WorkerCrashedError as exc:
                        outcomes.append(exc)
                errors = [o for o in outcomes if isinstance(o, BaseException)]
                assert len(errors) == 1, outcomes
                assert [o for o in outcomes if not isinstance(o, BaseException)] == [survivor]
                err = errors[0]
                assert err.pid == victim and err.module == "Sleep"
                assert f"pid {victim} on node {lost.node_id}" in str(err)
                assert "node has died" in str(err)

                # ... replaced on the surviving node within RECOVER_S, counted once.
                took = await _wait_for(
                    "the lost actor replaced", lambda: pool.stats().workers == 2, RECOVER_S
                )
                assert time.monotonic() - t_lost < RECOVER_S, took
                assert pool.stats().restarts == restarts + 1
                assert list(pool.worker_nodes()) == [kept.node_id]
                pids = await pool.run_parallel(M.Pid(), M.Pid())
                assert len(set(pids)) == 2 and survivor in pids

                # 2. The last node with the resource goes: waiting calls get a clear error.
                cluster.remove_node(kept)
                nodes.remove(kept)
                await _wait_for("both actors lost", lambda: pool.stats().workers == 0, 30)
                t0 = time.monotonic()
                with pytest.raises(af.WorkerStartError, match="not placed and started") as info:
                    await pool.forward(M.Pid(), None)
                assert time.monotonic() - t0 < START_TIMEOUT + 5
                assert f"start_timeout={START_TIMEOUT:g} s" in str(info.value)
                assert f"{tag} 0 free" in str(info.value)

                # 3. A node added later is used by the replacements.
                new = add()
                nodes.append(new)
                await _wait_for(
                    "replacements on the new node",
                    lambda: pool.stats().workers == 2,
                    START_TIMEOUT + 5 + RECOVER_S,
                )
                assert list(pool.worker_nodes()) == [new.node_id]
                assert isinstance(await pool.forward(M.Pid(), None), int)
        finally:
            for n in nodes:
                cluster.remove_node(n)


class TestZeroCopy:
    """The packing that lets tensors cross Ray without copies (no actors needed)."""

    def test_large_cpu_tensors_travel_as_views_of_their_storage(self) -> None:
        big = torch.randn(ZERO_COPY_BYTES // 4 + 1)
        small = torch.randn(10)
        grad = torch.randn(ZERO_COPY_BYTES // 4 + 1, requires_grad=True)
        p = _pack({"big": big, "small": small, "grad": grad})
        assert len(p.arrays) == 1
        assert p.arrays[0].ctypes.data == big.data_ptr()  # no copy
        assert len(p.blob) < grad.nbytes + 4096  # grad is in the pickle, big is not
        out = _unpack(p)
        assert out["big"].data_ptr() == big.data_ptr()
        assert torch.equal(out["small"], small) and out["grad"].requires_grad
        plain = ((small, [1, "a"]), {"k": small})  # nothing to take out: Ray pickles it once
        assert _pack(plain) is plain and _unpack(plain) is plain

    def test_read_only_received_arrays_become_tensors_without_a_copy_or_warning(self) -> None:
        t = torch.arange(ZERO_COPY_BYTES, dtype=torch.int16).reshape(-1, 8)
        p = _pack((t,))
        ro = np.frombuffer(p.arrays[0].tobytes(), dtype=np.uint8)  # as Ray hands them over
        assert not ro.flags.writeable
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (back,) = _unpack(p._replace(arrays=[ro]))
        assert back.data_ptr() == ro.ctypes.data
        assert back.shape == t.shape and torch.equal(back, t)
        assert math.prod(back.shape) * 2 == ro.nbytes
