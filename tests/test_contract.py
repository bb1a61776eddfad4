"""One contract, every pool (loky's pattern): the same tests against each backend.

The ``make_pool`` fixture builds a pool of the backend under test: ThreadPool,
ProcessPool, RayPool on a local Ray (skipped with the reason when Ray is not
installed) and CudaStreamPool (skipped with the reason without CUDA). Modules
come from ``tests.models`` so that process workers and Ray actors can import them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing.process
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import psutil
import pytest
import torch
import trio

import aioforward as af

from . import models as M
from .conftest import assert_pool_idle, pool_factory

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.anyio

BACKENDS = ["thread", "process", "ray", "cuda"]


@pytest.fixture(params=BACKENDS)
def make_pool(request: pytest.FixtureRequest) -> Iterator[Callable[..., af.Pool]]:
    """A factory for pools of one backend; every pool it made is closed after the test."""
    yield from pool_factory(request, 2, to_cpu=True)


def device_of(make: Callable[..., af.Pool]) -> str:
    return "cuda" if make.kind == "cuda" else "cpu"  # type: ignore[attr-defined]


def module(make: Callable[..., af.Pool], m: torch.nn.Module) -> torch.nn.Module:
    return m.to(device_of(make))


def ran(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


async def test_results_are_those_of_a_direct_call(make_pool: Callable[..., af.Pool]) -> None:
    m = module(make_pool, M.Tiny())
    x = torch.randn(3, 10, device=device_of(make_pool))
    async with make_pool() as pool:
        y = await pool.forward(m, x)
        with torch.no_grad():
            torch.testing.assert_close(y.to(x.device), m(x))
        # like a direct call under no_grad: an ordinary tensor, usable in place and in autograd
        assert not y.is_inference() and not y.requires_grad
        y.add_(1)
        out, mo, plain = await pool.forward(M.Nested(), M.Point(torch.ones(2), "a"), {"ts": []})
        assert isinstance(out, M.Output) and isinstance(mo, M.ModelOutput) and plain[1] == 3
        spec = af.ModuleSpec(M.build_tiny, 1)
        assert (await pool.forward(spec, torch.zeros(1, 10))).shape == (1, 5)
    assert_pool_idle(pool)


async def test_tensors_arrive_as_a_direct_call_sees_them(
    make_pool: Callable[..., af.Pool],
) -> None:
    """Layout (channels_last, a permute), requires_grad, Parameter, a lazy conjugate, and one
    tensor passed twice, small (in the message) and large (in shared memory), in a call's
    arguments, in its keyword arguments and in its result: as a direct call has them."""
    if make_pool.kind == "cuda":  # type: ignore[attr-defined]
        pytest.skip(
            "not for CudaStreamPool: it copies results to pinned CPU memory, and a layout "
            "across devices is not part of this contract"
        )
    small = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    big = torch.randn(8, 8, 32, 64).permute(3, 2, 0, 1)  # 128 KiB, dense, not contiguous
    weight = torch.nn.Parameter(torch.randn(3, 3))
    conj = torch.randn(3, dtype=torch.complex64).conj()
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((small, big), {}),  # plain tensors alone: a process pool's binary frame
        ((small, small, big, big), {}),
        ((small,), {"w": weight, "c": conj, "b": big, "again": small}),
        # keywords a process pool's frame carries: a large tensor, None, a bool, numbers
        ((small,), {"mask": big, "past": None, "use_cache": False, "k": 2, "t": 0.5}),
    ]
    async with make_pool(1) as pool:
        for args, kwargs in calls:
            with torch.no_grad():
                expected = M.Facts()(*args, **kwargs)
            assert await pool.forward(M.Facts(), *args, **kwargs) == expected
        for x in (torch.randn(3, 4, 5), torch.randn(32, 32, 32)):  # a result inline, in memory
            with torch.no_grad():
                direct = M.Permute()(x)
            y = await pool.forward(M.Permute(), x)
            assert y.stride() == direct.stride() and torch.equal(y, direct)
            y1, y2 = await pool.forward(M.Permute(), x, twice=True)
            assert y1 is y2 and y1.stride() == direct.stride()
            y1, [y2, none, two] = await pool.forward(M.Permute(), x, pair=True)
            assert y1.stride() == y2.stride() == direct.stride() and (none, two) == (None, 2)
            assert torch.equal(y1, direct) and torch.equal(y2, direct + 1)


async def test_exception_keeps_its_type(make_pool: Callable[..., af.Pool]) -> None:
    async with make_pool() as pool:
        with pytest.raises(ValueError, match=r"boom: \(2,\)"):
            await pool.forward(M.Boom(), torch.zeros(2))
        assert (await pool.forward(M.Echo(), 1))[0] == (1,)  # the worker survived
        assert pool.stats().failed == 1


async def test_queued_call_cancelled_never_runs(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    async with make_pool(1) as pool:
        await pool.wait_ready(60)
        running = pool.submit(M.Sleep(0.5))
        queued = pool.submit(M.RecordPid(str(log)))
        assert pool.stats().queued == 1 and not queued.running()
        assert queued.cancel() and queued.cancelled()
        assert pool.stats().queued == 0
        await running
        await pool.forward(M.Echo(), 1)  # the worker has moved past where it would have run
    assert ran(log) == 0
    assert pool.stats().cancelled == 1


async def test_running_call_cancelled_releases_the_caller(
    make_pool: Callable[..., af.Pool],
) -> None:
    async with make_pool(1) as pool:
        await pool.wait_ready(60)
        t0 = time.monotonic()
        with anyio.move_on_after(0.3) as scope:
            await pool.forward(M.Sleep(1.0))
        assert scope.cancelled_caught and time.monotonic() - t0 < 0.8
        assert pool.stats().cancelled == 1
        with anyio.fail_after(10):  # the slot returns once the work has ended
            assert (await pool.forward(M.Echo(), 2))[0] == (2,)


async def test_timeout_raises_the_builtin_timeout_error(
    make_pool: Callable[..., af.Pool],
) -> None:
    async with make_pool(1) as pool:
        await pool.wait_ready(60)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within its timeout"):
            await pool.forward(M.Sleep(1.0), timeout=0.2)
        assert time.monotonic() - t0 < 0.6
        with anyio.fail_after(30):
            assert (await pool.forward(M.Echo(), 3))[0] == (3,)


async def test_capacity_fifo_and_back_pressure(make_pool: Callable[..., af.Pool]) -> None:
    async with make_pool(1, max_queued=2) as pool:
        await pool.wait_ready(60)
        futs = [pool.submit(M.Sleep(0.2)), pool.submit(M.Echo(), 1), pool.submit(M.Echo(), 2)]
        with pytest.raises(af.QueueFullError, match="2 calls already queued"):
            pool.submit(M.Echo(), 3)
        assert pool.stats().busy == 1 and pool.stats().queued == 2
        await futs[0]
        assert [(await f)[0] for f in futs[1:]] == [(1,), (2,)]
    assert_pool_idle(pool)


async def test_run_parallel_cancels_what_it_submitted_when_a_later_submit_fails(
    make_pool: Callable[..., af.Pool], tmp_path: Path
) -> None:
    log = tmp_path / "ran"
    async with make_pool(1, max_queued=1) as pool:
        await pool.wait_ready(60)
        rec = M.RecordPid(str(log))
        with pytest.raises(af.QueueFullError):
            # the first runs, the second queues, the third finds the queue full
            await pool.run_parallel(af.call(M.Sleep(0.3)), af.call(rec), af.call(rec))
        assert pool.stats().queued == 0
        await pool.forward(M.Sleep(0.4))  # after the abandoned first call
    assert ran(log) == 0


async def test_a_closed_pool_refuses_at_once(make_pool: Callable[..., af.Pool]) -> None:
    pool = make_pool(1)
    await pool.forward(M.Echo(), 1)
    await pool.aclose()
    await pool.aclose()  # idempotent
    with anyio.fail_after(1):
        with pytest.raises(af.PoolClosedError, match="closed"):
            await pool.wait_ready()
        with pytest.raises(af.PoolClosedError):
            await pool.warmup(M.Tiny(), example=torch.zeros(1, 10))
        with pytest.raises(RuntimeError):  # as the standard executors: PoolClosedError is one
            pool.submit(M.Echo(), 1)
        with pytest.raises(af.PoolClosedError):
            await pool.forward(M.Echo(), 1)


async def test_constructing_starts_nothing(
    make_pool: Callable[..., af.Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the starts themselves rather than diff the process table: a
    # straggler of an earlier test (a worker still exiting, the resource
    # tracker) must not fail this one, and a start here must.
    started: list[str] = []

    def recording(cls: type, what: str) -> None:
        original = cls.start  # type: ignore[attr-defined]

        def start(self: Any, *args: Any, **kwargs: Any) -> Any:
            started.append(f"{what} {self!r}")
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "start", start)

    recording(threading.Thread, "thread")
    recording(multiprocessing.process.BaseProcess, "process")
    pool = make_pool(2)
    assert started == []
    assert pool.stats().workers == 0 and pool.worker_pids() == []
    await pool.wait_ready(60)  # the first use starts the workers
    assert pool.stats().workers == 2
    assert started  # so the recording above can see a start
    if make_pool.kind == "process":  # type: ignore[attr-defined]
        assert len(pool.worker_pids()) == 2


def test_one_pool_serves_successive_loops(make_pool: Callable[..., af.Pool]) -> None:
    pool = make_pool(1)

    async def one(i: int) -> Any:
        return (await pool.forward(M.Echo(), i))[0]

    assert asyncio.run(one(1)) == (1,)
    assert asyncio.run(one(2)) == (2,)
    assert trio.run(one, 3) == (3,)
    assert pool.submit(M.Echo(), 4).result(30)[0] == (4,)  # and sync threads


def test_executor_face(make_pool: Callable[..., af.Pool]) -> None:
    pool = make_pool(2)
    assert pool.submit(M.Echo(), 5).result(60)[0] == (5,)
    results = pool.map(M.Echo(), [1, 2, 3])
    assert [r[0] for r in results] == [(1,), (2,), (3,)]
    # shutdown(wait=False): returns at once; calls running and queued still complete
    futs = [pool.submit(M.Sleep(0.3)) for _ in range(4)]
    t0 = time.monotonic()
    pool.shutdown(wait=False)
    assert time.monotonic() - t0 < 0.2
    concurrent.futures.wait(futs, timeout=30)
    assert all(f.done() and f.exception() is None for f in futs)
    with pytest.raises(RuntimeError):
        pool.submit(M.Echo(), 1)


def test_shutdown_cancel_futures_cancels_the_queued(make_pool: Callable[..., af.Pool]) -> None:
    pool = make_pool(1)
    pool.submit(M.Echo(), 0).result(60)
    first = pool.submit(M.Sleep(0.3))
    queued = [pool.submit(M.Echo(), i) for i in range(5)]
    pool.shutdown(wait=True, cancel_futures=True)
    assert first.result() is not None
    assert all(f.cancelled() for f in queued)


def test_map_timeout_counts_from_the_call(make_pool: Callable[..., af.Pool]) -> None:
    pool = make_pool(2)
    pool.submit(M.Echo(), 0).result(60)
    t0 = time.monotonic()
    results = pool.map(M.Sleep(0.4), *([[None] * 8]), timeout=1.0)
    with pytest.raises(TimeoutError):
        list(results)
    assert 0.9 < time.monotonic() - t0 < 1.5  # 8 x 0.4 s on 2 workers would take 1.6 s


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"workers": 0}, ValueError, "workers must be an int >= 1, got 0"),
        ({"workers": "2"}, TypeError, "workers must be an int >= 1, got '2'"),
        ({"max_queued": -1}, ValueError, "max_queued must be an int >= 0 or None, got -1"),
        ({"max_queued": 1.5}, TypeError, "max_queued"),
    ],
)
def test_bad_arguments_fail_at_construction(
    make_pool: Callable[..., af.Pool], kwargs: dict[str, Any], error: type, words: str
) -> None:
    kwargs = dict(kwargs)  # parametrize shares the dict between backends
    workers = kwargs.pop("workers", 1)
    with pytest.raises(error, match=words):
        make_pool(workers, **kwargs)


def test_dropped_pool_is_finalized(make_pool: Callable[..., af.Pool]) -> None:
    """A pool dropped without close() finishes the calls already submitted and stops."""
    import gc

    pool = make_pool(1)
    fut = pool.submit(M.Sleep(0.2))
    pids = pool.worker_pids()
    results = pool.map(M.Echo(), [1, 2])  # a map result does not keep the pool alive
    threads = {t for t in threading.enumerate() if t.name.startswith("aioforward")}
    assert threads or make_pool.kind == "ray"  # type: ignore[attr-defined]  # Ray's are its own
    del pool
    gc.collect()
    assert fut.result(30) is not None
    assert [r[0] for r in results] == [(1,), (2,)]
    deadline = time.monotonic() + 15
    while any(t.is_alive() for t in threads) or any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"still alive: {[t.name for t in threads if t.is_alive()]} {pids}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_backends_import_no_private_name_of_a_sibling() -> None:
    """Each backend module imports only public names (or its own package's) from siblings."""
    import ast

    root = Path(af.__file__).parent
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            # ``from . import _module`` imports a module; ``from .x import _name`` reaches
            # into a sibling's private name, which is what this test forbids
            if isinstance(node, ast.ImportFrom) and node.level and node.module is not None:
                for alias in node.names:
                    assert not alias.name.startswith("_"), (
                        f"{path.relative_to(root)}: from {'.' * node.level}{node.module} "
                        f"import {alias.name}"
                    )
        if path.parent.name == "pools" and path.stem in ("thread", "cuda", "ray"):
            text = path.read_text()
            others = {"thread", "cuda", "ray", "process"} - {path.stem}
            if path.stem == "cuda":
                others.discard("thread")  # the CUDA pool is a ThreadPool with streams
            for other in others:
                assert f"from .{other}" not in text, f"{path.name} imports the {other} backend"


def test_importing_aioforward_loads_neither_ray_nor_the_cuda_pool() -> None:
    import subprocess

    code = (
        "import sys, aioforward as af\n"
        "af.ProcessPool, af.ThreadPool\n"
        "assert 'ray' not in sys.modules, 'ray'\n"
        "assert 'aioforward.pools.cuda' not in sys.modules\n"
        "assert af.CudaStreamPool.__module__ == 'aioforward'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_anyio_backend_is_imported_with_aioforward_not_in_the_loop() -> None:
    """anyio imports its backend on first use, in the event loop's thread (a pool's first
    start froze the loop for 45-53 ms here): aioforward imports it before any loop runs."""
    import subprocess

    for code in (
        "import sys, aioforward\n"
        "assert 'anyio._backends._asyncio' in sys.modules\n"
        "assert 'anyio._backends._trio' not in sys.modules  # this program does not use trio\n",
        "import sys, trio, aioforward\nassert 'anyio._backends._trio' in sys.modules\n",
    ):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


def test_raypool_without_ray_says_which_extra_to_install() -> None:
    """Without Ray, and so without numpy (which only Ray brings), ``RayPool`` names the extra
    to install; it used to fail importing numpy before it got there."""
    import subprocess

    code = (
        "import sys\n"
        "sys.modules['ray'] = sys.modules['numpy'] = None  # neither is installed\n"
        "import aioforward as af\n"
        "try:\n"
        "    af.RayPool(workers=1)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'aioforward[ray]'" in done.stdout, done.stdout + done.stderr


def test_no_import_cycles_between_modules() -> None:
    """Import every module on its own in a fresh interpreter: a cycle fails one of them."""
    import subprocess

    root = Path(af.__file__).parent
    names = sorted(
        "aioforward." + ".".join(p.relative_to(root).with_suffix("").parts)
        for p in root.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "bench" not in p.parts
    )
    names = [n for n in names if not n.endswith((".ray", ".metrics"))]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    for m in [k for k in sys.modules if k.startswith('aioforward')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(n)\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
