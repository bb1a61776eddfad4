"""Shared fixtures: every async test runs on asyncio, asyncio+uvloop and trio, and
every test is checked for leaked threads, processes, /dev/shm segments, file
descriptors and capacity tokens."""

from __future__ import annotations

import faulthandler
import functools
import gc
import inspect
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

import aioforward
from aioforward import _api

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator

torch.set_num_threads(1)  # tests run two workers on two cores; keep the parent quiet

pytest_plugins = ["anyio"]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


LONG_LIVED_SHM: set[str] = set()  # prefixes of module-scoped pools: their warm segments stay


def _shm_entries() -> set[str]:
    try:
        return {
            p.name
            for p in Path("/dev/shm").iterdir()
            if p.name.startswith("aiofwd") and not p.name.startswith(tuple(LONG_LIVED_SHM))
        }
    except OSError:
        return set()


def open_fds() -> dict[str, str]:
    """Open descriptors, minus event-loop internals (epoll/eventfd/signalfd): the anyio
    runner keeps a loop alive across tests, and those are not ours to close."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("anon_inode:"):
            out[fd] = target
    return out


LONG_LIVED_THREADS: set[str] = set()  # threads of module-scoped pools (e.g. their timer)


def _threads() -> set[threading.Thread]:
    return {
        t
        for t in threading.enumerate()
        if t.name.startswith("aioforward") and t.name not in LONG_LIVED_THREADS
    }


class _Watchdog:
    """The last line of "nothing hangs". pytest-timeout stops a test that outruns its
    timeout by raising in the main thread (SIGALRM); a wait that retries, or a teardown that
    waits on what the test left behind, can outlast that. A test still running
    ``hang_grace`` seconds (an ini option) past its timeout gets every thread's stack dumped
    and its name printed last (where a CI log's tail shows it), and the run ends with exit
    status 3: in minutes, not at CI's limit."""

    def __init__(self, fd: int, grace: float) -> None:
        self.fd = fd  # stderr, duplicated before pytest captures it
        self.grace = grace
        self.changed = threading.Condition()
        self.deadline: float | None = None
        self.test = ""
        threading.Thread(target=self.watch, name="tests-watchdog", daemon=True).start()

    def arm(self, test: str, timeout: float | None) -> None:
        """Watch ``test``, which has ``timeout`` seconds (None: no limit, or no test)."""
        with self.changed:
            self.test = test
            self.deadline = None if timeout is None else time.monotonic() + timeout + self.grace
            self.changed.notify()

    def watch(self) -> None:
        with self.changed:
            while self.deadline is None or time.monotonic() < self.deadline:
                left = None if self.deadline is None else self.deadline - time.monotonic()
                self.changed.wait(left)
            test = self.test
        faulthandler.dump_traceback(self.fd, all_threads=True)
        why = "past its timeout (every thread's stack is above): ending the run"
        os.write(self.fd, f"\nHANG: {test} ran {self.grace:g} s {why}\n".encode())
        os._exit(3)


_WATCHDOG = pytest.StashKey[_Watchdog]()


def _timeout_s(item: pytest.Item) -> float | None:
    """The test's pytest-timeout limit: its ``timeout`` mark, else ``--timeout``, else the
    ini's; None for no limit (0, as pytest-timeout reads it, or pytest-timeout not loaded)."""
    if not item.config.pluginmanager.has_plugin("timeout"):
        return None
    mark = item.get_closest_marker("timeout")
    value = None
    if mark is not None:
        value = mark.args[0] if mark.args else mark.kwargs.get("timeout")
    if value is None:
        value = item.config.getoption("timeout", None)
    if value is None:
        value = item.config.getini("timeout")
    return float(value) if value and float(value) > 0 else None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "hang_grace", "seconds a test may run past its timeout (see _Watchdog)", default="90"
    )


def pytest_configure(config: pytest.Config) -> None:
    # stderr, duplicated now: pytest captures fd 2 while tests run
    config.stash[_WATCHDOG] = _Watchdog(os.dup(2), float(config.getini("hang_grace")))


def pytest_enter_pdb(config: pytest.Config) -> None:
    """A debugger session is not a hang (pytest-timeout stands down for one too)."""
    config.stash[_WATCHDOG].arm("", None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Arm the watchdog for the whole test: setup, call and teardown."""
    watchdog = item.config.stash[_WATCHDOG]
    watchdog.arm(item.nodeid, _timeout_s(item))
    try:
        return (yield)
    finally:
        watchdog.arm("", None)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """Give an async test its timeout inside its event loop, as a cancel scope: on uvloop
    and trio, pytest-timeout's exception (raised from a SIGALRM handler) does not stop the
    test: uvloop drops an exception its signal handling raises, and anyio runs a trio test
    in a loop the exception never reaches. The scope's deadline comes first (at 90% of the
    timeout), so a stuck async test fails on its own loop, and the run goes on."""
    test, limit = pyfuncitem.obj, _timeout_s(pyfuncitem)
    if limit is None or not inspect.iscoroutinefunction(test) or hasattr(test, "hypothesis"):
        return (yield)
    seconds = 0.9 * limit

    @functools.wraps(test)
    async def with_deadline(**kwargs: Any) -> Any:
        with anyio.CancelScope(deadline=anyio.current_time() + seconds) as scope:
            return await test(**kwargs)
        if scope.cancelled_caught:
            pytest.fail(f"timed out after {seconds:g} s in its event loop (90% of its timeout)")

    pyfuncitem.obj = with_deadline
    try:
        return (yield)
    finally:
        pyfuncitem.obj = test


@pytest.fixture(scope="session", autouse=True)
def _prime_process_globals() -> None:
    """Allocate once what lives as long as the process (uvloop's signal wake-up pipe,
    multiprocessing's resource tracker, started by the first spawn, the CUDA driver's
    context), so the per-test checks see only what a test leaked."""
    from multiprocessing import resource_tracker

    import uvloop

    resource_tracker.ensure_running()

    async def nothing() -> None:
        pass

    uvloop.run(nothing())
    if torch.cuda.is_available():  # the driver's descriptors and threads, made with its context
        torch.empty(1, device="cuda").add_(1)
        torch.empty(1, pin_memory=True)
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves threads, processes, shm segments, fds or the default pool."""
    me = psutil.Process()
    threads, children = _threads(), {p.pid for p in me.children(recursive=True)}
    shm, fds = _shm_entries(), open_fds()
    yield
    if _api._default_owned:  # a test used the lazily created default pool: retire it
        aioforward.set_default_pool(None)
    deadline = time.monotonic() + 5
    while True:
        gc.collect()
        extra_threads = _threads() - threads
        extra_children = [
            p
            for p in me.children(recursive=True)
            if p.pid not in children and _alive(p) and not _in_ray_node(p)
        ]
        extra_shm = _shm_entries() - shm
        now_fds = open_fds()
        extra_fds = {
            k: v
            for k, v in now_fds.items()
            if fds.get(k) != v
            and not ((v.startswith("socket:") or "/ray/session_" in v) and _ray_running())
            and not v.startswith("/dev/nvidia")  # the CUDA driver's, as its allocators grow
        }
        if not (extra_threads or extra_children or extra_shm or extra_fds):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    pytest.fail(
        f"leaked: threads={sorted(t.name for t in extra_threads)} "
        f"processes={[p.pid for p in extra_children]} shm={sorted(extra_shm)} "
        f"fds={extra_fds}"
    )


def _ray_running() -> bool:
    """A Ray node (started by tests/test_ray.py's module fixture) owns its own processes and
    gRPC sockets, which come and go as Ray sees fit; RayPool's own clean-up is tested there."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _in_ray_node(p: psutil.Process) -> bool:
    try:
        chain = [p, *p.parents()]
        return any(
            q.name() in ("raylet", "gcs_server") or "site-packages/ray/" in " ".join(q.cmdline())
            for q in chain
        )
    except psutil.Error:
        return True  # gone meanwhile


def assert_pool_idle(pool: aioforward.Pool) -> None:
    s = pool.stats()
    assert (s.busy, s.queued) == (0, 0), s


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """One local Ray for a test module's RayPools (a Ray start takes seconds), up while the
    per-test leak check runs (Ray keeps log files and sockets of its own open after
    ``ray.shutdown()``). Skips with the reason when Ray is not installed."""
    ray = pytest.importorskip(
        "ray", reason="Ray is an optional extra: pip install 'aioforward[ray]'"
    )
    root = str(Path(__file__).resolve().parent.parent)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": root}},  # the actors import tests.models
    )
    yield ray
    ray.shutdown()


def pool_factory(
    request: pytest.FixtureRequest, workers: int, **cuda: Any
) -> Iterator[Callable[..., aioforward.Pool]]:
    """A factory for pools of the backend ``request.param`` names (thread, process, ray or
    cuda: skipped with the reason where this machine cannot run it); every pool it made is
    closed after the test. ``cuda``: options of the CUDA pool."""
    import weakref

    from aioforward.pools.cuda import cuda_unavailable_reason

    kind = request.param
    if kind == "ray":
        request.getfixturevalue("local_ray")
    if kind == "cuda" and (why := cuda_unavailable_reason()) is not None:
        pytest.skip(f"needs a CUDA GPU: {why}")
    made: list[weakref.ref[aioforward.Pool]] = []  # weak: a test may drop its pool on purpose

    def make(workers: int = workers, **kwargs: Any) -> aioforward.Pool:
        pool: aioforward.Pool
        if kind == "thread":
            pool = aioforward.ThreadPool(workers, **kwargs)
        elif kind == "process":
            pool = aioforward.ProcessPool(workers, **kwargs)
        elif kind == "ray":
            pool = aioforward.RayPool(workers, num_cpus_per_worker=0.5, **kwargs)
        else:
            pool = aioforward.CudaStreamPool(workers=workers, **cuda, **kwargs)
        made.append(weakref.ref(pool))
        return pool

    make.kind = kind  # type: ignore[attr-defined]
    yield make
    for ref in made:
        if (pool := ref()) is not None:
            pool.close()


def record_reply_readers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name of the thread that reads each message from a process pool's
    workers (a task's event loop, or the pool's supervisor), in order.

    Example: ``readers = record_reply_readers(monkeypatch)``.
    """
    from aioforward.pools.process._supervisor import Supervisor

    readers: list[str] = []
    handle = Supervisor.handle

    def record(self: Supervisor, w: Any, data: bytes, in_loop: bool = False) -> bool:
        readers.append(threading.current_thread().name)
        return handle(self, w, data, in_loop)

    monkeypatch.setattr(Supervisor, "handle", record)
    return readers
