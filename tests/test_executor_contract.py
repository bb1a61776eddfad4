"""The Executor contract, checked with CPython's own concurrent.futures tests.

aioforward's pools are ``concurrent.futures.Executor`` subclasses. This module runs CPython's
own test file for the standard executors against them, so "it is an Executor" means what
CPython itself tests, not what we thought of testing.

The CPython file
    ``tests/cpython/test_concurrent_futures_3_11_2.py`` is CPython v3.11.2's
    ``Lib/test/test_concurrent_futures.py``, unmodified, under the PSF license
    (``tests/cpython/LICENSE``, from the same release); sha256
    18d0f9c09cca22a43fac638aced90ca4c258b160f6ae287b02933c4843ca1ab3. The same bytes are in
    the upstream Python-3.11.2 tarball (Debian's ``python3.11_3.11.2.orig.tar.gz``) and in
    Debian bookworm's ``libpython3.11-testsuite`` 3.11.2-6+deb12u9
    (``/usr/lib/python3.11/test/test_concurrent_futures.py``). Not 3.11.7, the interpreter
    here: later 3.11 releases split the file into the package
    ``Lib/test/test_concurrent_futures/`` (3.11.7's libregrtest lists it among the split test
    directories). Vendored rather than fetched in CI: Debian replaces that package with each
    security update and the old version leaves the archive, and CI then needs no network. It
    uses ``test.support`` of the running interpreter (pyenv's and Debian's Pythons ship it).
    ``tests/cpython/conftest.py`` keeps pytest from collecting it on its own.

The adapter
    ``AfThreadExecutor`` and ``AfProcessExecutor`` only map the standard constructors:
    ``max_workers`` -> ``workers``; ``initializer``/``initargs`` as they are (ProcessPool);
    ``max_tasks_per_child`` -> ``max_calls_per_worker``; ``thread_name_prefix`` -> ``name``;
    ``mp_context`` is accepted when it is spawn (aioforward always spawns) and refused
    otherwise. ThreadPool gets ``threads_per_worker=0`` so it leaves torch's thread count
    alone. ThreadPool has no initializer, so the initializer tests do not apply to it.

    Two test settings differ from CPython's, both in the process mixin: the pool is started
    and waited for (``wait_ready``) in ``setUp``, as CPython itself did up to 3.8
    (``_prime_executor``), since an aioforward worker imports torch (about a second of CPU each)
    and the tests' time budgets (``wait(timeout=5)``, ...) are about the Executor, not torch's
    import; and process classes run 2 workers instead of 5 (this machine has 2 cores; no
    applicable test depends on the count).

The classes
    Every class CPython builds for its own executors is built here for ours, with the same
    mixins: threads (``AfThread*Test``) and processes with the spawn, fork and forkserver
    contexts (``AfProcess{Spawn,Fork,Forkserver}*Test``), plus ``AfFutureTest``, CPython's
    Future tests run on :class:`aioforward.ForwardFuture` (what the pools return).

What does not apply, and why: ``NOT_APPLICABLE`` below, the one list. Tests that read the
standard executors' private attributes, drive the standard executors themselves, or need
fork. Where such a test also checks something public, a test after the tables checks that
part on our pools ("public counterpart"). ``DELIBERATE`` lists the CPython tests that fail
because aioforward deliberately differs (a crashed worker is replaced instead of breaking the
pool; a failing initializer keeps retrying; a call whose data cannot cross fails alone); each
names the test here that pins our behaviour. ``KNOWN_BUGS`` are aioforward bugs, marked
``xfail(strict=True)`` so the suite stays green and the day they are fixed it says so.

RayPool is not covered: a Ray node takes many seconds to start and each actor is a process
importing torch, too slow for this suite on 2 cores; its Executor face is ``tests/test_ray.py``'s.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import unittest
import unittest.mock
from concurrent.futures import BrokenExecutor, InvalidStateError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from pickle import PicklingError, UnpicklingError
from typing import Any

import anyio
import pytest

import aioforward

from .cpython import test_concurrent_futures_3_11_2 as cf

ROOT = Path(__file__).resolve().parent.parent
CPYTHON_FILE_SHA256 = "18d0f9c09cca22a43fac638aced90ca4c258b160f6ae287b02933c4843ca1ab3"
PROCESS_WORKERS = 2  # CPython's mixins use 5; see the module docstring


# ------------------------------------------------------------------- the adapter
class AfThreadExecutor(aioforward.ThreadPool):
    """``ThreadPoolExecutor``'s constructor on :class:`aioforward.ThreadPool`."""

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        if initializer is not None or initargs:
            raise TypeError("aioforward.ThreadPool has no initializer")
        super().__init__(max_workers, threads_per_worker=0, name=thread_name_prefix or None)


class AfProcessExecutor(aioforward.ProcessPool):
    """``ProcessPoolExecutor``'s constructor on :class:`aioforward.ProcessPool`."""

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Any = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        if mp_context is not None and mp_context.get_start_method() != "spawn":
            raise ValueError("aioforward.ProcessPool always starts its workers with spawn")
        super().__init__(
            max_workers,
            initializer=initializer,
            initargs=initargs,
            max_calls_per_worker=max_tasks_per_child,
        )


class AfThreadMixin(cf.ExecutorMixin):
    executor_type = AfThreadExecutor


class _AfProcessMixin(cf.ExecutorMixin):
    executor_type = AfProcessExecutor
    worker_count = PROCESS_WORKERS
    af_prime = True  # start the workers in setUp (off where a test needs a pool not started)

    def setUp(self) -> None:
        super().setUp()
        if self.af_prime:
            anyio.run(self.executor.wait_ready, 60)


class AfProcessSpawnMixin(_AfProcessMixin, cf.ProcessPoolSpawnMixin):
    pass


class AfProcessForkMixin(_AfProcessMixin, cf.ProcessPoolForkMixin):
    pass


class AfProcessForkserverMixin(_AfProcessMixin, cf.ProcessPoolForkserverMixin):
    pass


def _define(name: str, bases: tuple[type, ...], **attrs: Any) -> None:
    """A test class in this module's namespace, where pytest collects it (and pickle finds it)."""
    globals()[name] = type(name, bases, {"__module__": __name__, "__qualname__": name, **attrs})


# The classes CPython's file builds for ThreadPoolExecutor, built on our adapter instead.
_define("AfThreadInitializerTest", (cf.InitializerMixin, AfThreadMixin, cf.BaseTestCase))
_define(
    "AfThreadFailingInitializerTest",
    (cf.FailingInitializerMixin, AfThreadMixin, cf.BaseTestCase),
)
_define("AfThreadShutdownTest", (AfThreadMixin, cf.ThreadPoolShutdownTest))
_define("AfThreadWaitTest", (AfThreadMixin, cf.ThreadPoolWaitTests))
_define("AfThreadAsCompletedTest", (cf.AsCompletedTests, AfThreadMixin, cf.BaseTestCase))
_define("AfThreadExecutorTest", (AfThreadMixin, cf.ThreadPoolExecutorTest))

# ... and for ProcessPoolExecutor, with each of its three start methods.
for _ctx, _mixin in [
    ("Spawn", AfProcessSpawnMixin),
    ("Fork", AfProcessForkMixin),
    ("Forkserver", AfProcessForkserverMixin),
]:
    for _suffix, _tests, _prime in [
        ("Initializer", cf.InitializerMixin, True),
        ("FailingInitializer", cf.FailingInitializerMixin, False),
        ("Shutdown", cf.ProcessPoolShutdownTest, True),
        ("Wait", cf.WaitTests, True),
        ("AsCompleted", cf.AsCompletedTests, True),
        ("Executor", cf.ProcessPoolExecutorTest, True),
        ("Deadlock", cf.ExecutorDeadlockTest, False),  # each test makes its own executor
    ]:
        _define(f"AfProcess{_ctx}{_suffix}Test", (_tests, _mixin, cf.BaseTestCase), af_prime=_prime)


class AfFutureTest(cf.FutureTests):
    """CPython's Future tests on :class:`aioforward.ForwardFuture`: the file's ``Future`` (used
    by the tests and by its ``create_future``) is ours while a test runs. Its module-level
    futures (``PENDING_FUTURE``, ...) stay standard ones."""

    def setUp(self) -> None:
        super().setUp()
        for patch in [
            unittest.mock.patch.object(cf, "Future", aioforward.ForwardFuture),
            # As under unittest, a failing callback's log record reaches stderr (logging's
            # last resort), where the tests look for it, not pytest's log capture.
            unittest.mock.patch.object(logging.getLogger("concurrent.futures"), "propagate", False),
        ]:
            patch.start()
            self.addCleanup(patch.stop)


# ------------------------------------------------------------------- the tables
_SUBPROCESS = (
    "its child interpreter runs `from concurrent.futures import <executor_type.__name__>` and "
    "imports test.test_concurrent_futures: hard-wired to the standard executors (public "
    "counterpart: test_interpreter_exit_*)"
)
_STD_ONLY = "constructs the standard {} itself and reads its private {}"
_FORK = (
    "aioforward.ProcessPool always starts its workers with spawn (fork after torch or threads "
    "have started deadlocks); the spawn variant of this class runs"
)
_MESSAGE = (
    "matches the standard's message, which names its own parameter max_workers; aioforward's "
    "is workers (public counterpart: test_nonpositive_workers)"
)

# "Class.test" for one test, "Class" for every test of a class.
NOT_APPLICABLE: dict[str, str] = {
    # --- threads
    "AfThreadInitializerTest": "aioforward.ThreadPool has no initializer parameter",
    "AfThreadFailingInitializerTest": "aioforward.ThreadPool has no initializer parameter",
    "AfThreadShutdownTest.test_interpreter_shutdown": _SUBPROCESS,
    "AfThreadShutdownTest.test_submit_after_interpreter_shutdown": _SUBPROCESS,
    "AfThreadShutdownTest.test_hang_gh83386": _SUBPROCESS,
    "AfThreadShutdownTest.test_cancel_futures_wait_false": _SUBPROCESS,
    "AfThreadShutdownTest.test_threads_terminate": (
        "reads the private _threads and expects one thread started per submit (aioforward "
        "starts every worker at the first submit); that shutdown ends the threads is checked "
        "after every test by the leak checker of tests/conftest.py"
    ),
    "AfThreadShutdownTest.test_context_manager_shutdown": _STD_ONLY.format(
        "ThreadPoolExecutor", "_threads (public counterpart: test_context_manager_shutdown)"
    ),
    "AfThreadShutdownTest.test_del_shutdown": _STD_ONLY.format(
        "ThreadPoolExecutor", "_threads (public counterpart: test_del_shutdown)"
    ),
    "AfThreadShutdownTest.test_shutdown_no_wait": _STD_ONLY.format(
        "ThreadPoolExecutor", "_threads (public counterpart: test_shutdown_no_wait)"
    ),
    "AfThreadShutdownTest.test_thread_names_assigned": _STD_ONLY.format(
        "ThreadPoolExecutor", "_threads (public counterpart: test_thread_names_assigned)"
    ),
    "AfThreadShutdownTest.test_thread_names_default": _STD_ONLY.format(
        "ThreadPoolExecutor", "_threads and checks its default names (ours: aioforward-thread-N)"
    ),
    "AfThreadExecutorTest.test_max_workers_negative": _MESSAGE,
    "AfThreadExecutorTest.test_default_workers": (
        "reads the private _max_workers and checks the standard's default, min(32, cpus + 4); "
        "aioforward's default is the usable CPUs"
    ),
    "AfThreadExecutorTest.test_saturation": (
        "reads the private _max_workers and _threads (public counterpart: test_saturation)"
    ),
    "AfThreadExecutorTest.test_idle_thread_reuse": (
        "reads the private _threads and expects a new thread per call until one is idle "
        "(aioforward starts every worker at the first submit)"
    ),
    "AfThreadExecutorTest.test_hang_global_shutdown_lock": (
        "drives only standard executors (a ThreadPoolExecutor and a fork ProcessPoolExecutor); "
        "its point, that a process forked while a pool is open still exits, is "
        "test_fork_child_of_open_pool_exits"
    ),
    # --- processes (spawn)
    "AfProcessSpawnShutdownTest.test_interpreter_shutdown": _SUBPROCESS,
    "AfProcessSpawnShutdownTest.test_submit_after_interpreter_shutdown": _SUBPROCESS,
    "AfProcessSpawnShutdownTest.test_hang_gh83386": _SUBPROCESS,
    "AfProcessSpawnShutdownTest.test_processes_terminate": (
        "reads the private _processes (that shutdown ends the workers is checked after every "
        "test by the leak checker of tests/conftest.py)"
    ),
    "AfProcessSpawnShutdownTest.test_context_manager_shutdown": _STD_ONLY.format(
        "ProcessPoolExecutor", "_processes (public counterpart: test_context_manager_shutdown)"
    ),
    "AfProcessSpawnShutdownTest.test_del_shutdown": _STD_ONLY.format(
        "ProcessPoolExecutor",
        "_executor_manager_thread, _processes and _call_queue (public counterpart: "
        "test_del_shutdown)",
    ),
    "AfProcessSpawnShutdownTest.test_shutdown_no_wait": _STD_ONLY.format(
        "ProcessPoolExecutor",
        "_executor_manager_thread, _processes and _call_queue (public counterpart: "
        "test_shutdown_no_wait)",
    ),
    "AfProcessSpawnExecutorTest.test_max_workers_negative": _MESSAGE,
    "AfProcessSpawnExecutorTest.test_traceback": (
        "checks that the cause is the private concurrent.futures.process._RemoteTraceback "
        "(public counterpart: test_worker_traceback_is_the_cause)"
    ),
    "AfProcessSpawnExecutorTest.test_saturation": "reads the private _max_workers and _processes",
    "AfProcessSpawnExecutorTest.test_idle_process_reuse_one": (
        "reads the private _max_workers and _processes and expects a new process per call "
        "until one is idle (aioforward starts every worker at the first submit)"
    ),
    "AfProcessSpawnExecutorTest.test_idle_process_reuse_multiple": (
        "reads the private _max_workers and _processes and expects processes started on "
        "demand (aioforward starts every worker at the first submit)"
    ),
    "AfProcessSpawnExecutorTest.test_max_tasks_per_child": (
        "reads the private _processes (public counterpart: test_max_tasks_per_child)"
    ),
    "AfProcessSpawnExecutorTest.test_max_tasks_per_child_defaults_to_spawn_context": (
        "reads the private _mp_context (aioforward always spawns)"
    ),
    "AfProcessSpawnDeadlockTest.test_shutdown_deadlock_pickle": (
        "reads the private _executor_manager_thread (and fails at submit as "
        "test_error_at_task_pickle does: see DELIBERATE)"
    ),
    # --- ForwardFuture
    "AfFutureTest.test_multiple_set_result": (
        "matches repr() text '<Future at ...'; a ForwardFuture's repr names its class, "
        "'<ForwardFuture at ...' (public counterpart: test_setting_a_future_twice)"
    ),
    "AfFutureTest.test_multiple_set_exception": (
        "matches repr() text '<Future at ...'; a ForwardFuture's repr names its class, "
        "'<ForwardFuture at ...' (public counterpart: test_setting_a_future_twice)"
    ),
    # --- processes (fork, forkserver): every class
    **{
        f"AfProcess{ctx}{suffix}Test": _FORK
        for ctx in ("Fork", "Forkserver")
        for suffix in (
            "Initializer",
            "FailingInitializer",
            "Shutdown",
            "Wait",
            "AsCompleted",
            "Executor",
            "Deadlock",
        )
    },
}

_CROSS_ARGS = (
    "a call whose arguments cannot be decoded in the worker fails alone, with the exception "
    "that decoding raised; the standard breaks the whole pool (BrokenProcessPool): "
    "test_argument_that_cannot_cross_fails_alone"
)
_CROSS_RESULT = (
    "a call whose result cannot cross fails alone, with SerializationError (a PicklingError) "
    "naming what pickling or unpickling raised; the standard re-raises that exception from "
    "the worker, or breaks the whole pool when the parent cannot unpickle: "
    "test_result_that_cannot_cross_fails_alone"
)

DELIBERATE: dict[str, str] = {
    "AfProcessSpawnFailingInitializerTest.test_initializer": (
        "a failing initializer fails the waiting calls with WorkerStartError (a BrokenExecutor) "
        "and keeps retrying with back-off instead of breaking the pool for good; the test also "
        "polls the private _broken and the standard's log records: "
        "test_failing_initializer_keeps_retrying"
    ),
    "AfProcessSpawnExecutorTest.test_killed_child": (
        "a killed worker fails only its own call (WorkerCrashedError, a BrokenProcessPool) and "
        "is replaced, and the pool keeps taking work; the test also reads the private "
        "_processes: test_killed_worker_is_replaced"
    ),
    "AfProcessSpawnDeadlockTest.test_error_at_task_pickle": (
        "arguments that cannot be pickled fail submit() itself with SerializationError (a "
        "PicklingError), before a worker is reserved; the standard fails the future: "
        "test_argument_that_cannot_cross_fails_alone"
    ),
    "AfProcessSpawnDeadlockTest.test_error_at_task_unpickle": _CROSS_ARGS,
    "AfProcessSpawnDeadlockTest.test_exit_at_task_unpickle": _CROSS_ARGS,
    "AfProcessSpawnDeadlockTest.test_exit_during_result_pickle_on_worker": _CROSS_RESULT,
    "AfProcessSpawnDeadlockTest.test_error_during_result_unpickle_in_result_handler": (
        _CROSS_RESULT
    ),
    "AfProcessSpawnDeadlockTest.test_exit_during_result_unpickle_in_result_handler": (
        _CROSS_RESULT
    ),
}

# "Class.test" for a CPython test, or the name of a test function below.
KNOWN_BUGS: dict[str, str] = {}  # none left: both found here were fixed


# ------------------------------------------------------------------- helpers
def make(kind: str, workers: int | None = None, **kwargs: Any) -> aioforward.Pool:
    if kind == "thread":
        return AfThreadExecutor(5 if workers is None else workers, **kwargs)
    return AfProcessExecutor(PROCESS_WORKERS if workers is None else workers, **kwargs)


KINDS = ["thread", "process"]
ADAPTER = {"thread": "AfThreadExecutor", "process": "AfProcessExecutor"}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that can import this test package."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _raise_unpickling_error() -> None:
    raise UnpicklingError("refused")


class UnpicklesWithError:
    """Like CPython's ErrorAtUnpickle, without replacing sys.stderr where it is unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _raise_unpickling_error, ()


def test_vendored_file_is_unmodified() -> None:
    """The CPython file is used as released (a formatter run over the repo must not touch it)."""
    text = (ROOT / "tests" / "cpython" / "test_concurrent_futures_3_11_2.py").read_bytes()
    assert hashlib.sha256(text).hexdigest() == CPYTHON_FILE_SHA256


# ------------------------------------------------------------------- public counterparts
@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_exit_finishes_submitted_calls(kind: str) -> None:
    """CPython's test_interpreter_shutdown on our pools: a pending call finishes at exit."""
    done = run_python(f"""
        from tests.test_executor_contract import {ADAPTER[kind]}
        from tests.cpython.test_concurrent_futures_3_11_2 import sleep_and_print
        if __name__ == "__main__":
            t = {ADAPTER[kind]}({5 if kind == "thread" else PROCESS_WORKERS})
            t.submit(sleep_and_print, 1.0, "apple")
        """)
    assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "apple")


@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_exit_refuses_late_submit(kind: str) -> None:
    """CPython's test_submit_after_interpreter_shutdown: an atexit hook's submit is refused."""
    done = run_python(f"""
        import atexit
        @atexit.register
        def run_last():
            try:
                t.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from tests.test_executor_contract import {ADAPTER[kind]}
        if __name__ == "__main__":
            t = {ADAPTER[kind]}({5 if kind == "thread" else PROCESS_WORKERS})
            t.submit(id, 42).result()
        """)
    assert done.stdout.strip() == "runtime-error"  # a RuntimeError, as the hook expects
    # The standard's message, or PoolClosedError's (a RuntimeError) for a pool that the exit
    # hook had already closed.
    assert re.search(
        r"RuntimeError: cannot schedule new futures after interpreter shutdown"
        r"|PoolClosedError: cannot submit to a pool that has been closed",
        done.stderr,
    ), done.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_interpreter_exit_after_shutdown_without_wait(kind: str) -> None:
    """CPython's test_hang_gh83386 (which it skips for ProcessPoolExecutor: a known hang there)."""
    done = run_python(f"""
        from tests.test_executor_contract import {ADAPTER[kind]}
        from tests.cpython.test_concurrent_futures_3_11_2 import sleep_and_print
        if __name__ == "__main__":
            t = {ADAPTER[kind]}(max_workers=3)
            t.submit(sleep_and_print, 1.0, "apple")
            t.shutdown(wait=False)
        """)
    assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "apple")


def test_interpreter_exit_after_shutdown_cancel_futures_without_wait() -> None:
    """CPython's test_cancel_futures_wait_false: the running call still finishes at exit."""
    done = run_python("""
        from tests.test_executor_contract import AfThreadExecutor
        from tests.cpython.test_concurrent_futures_3_11_2 import sleep_and_print
        if __name__ == "__main__":
            t = AfThreadExecutor()
            t.submit(sleep_and_print, .1, "apple")
            t.shutdown(wait=False, cancel_futures=True)
        """)
    assert (done.returncode, done.stderr, done.stdout.strip()) == (0, "", "apple")


@pytest.mark.parametrize("kind", KINDS)
def test_context_manager_shutdown(kind: str) -> None:
    with make(kind) as e:
        assert list(e.map(abs, range(-5, 5))) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    assert e.closed
    # that no worker is left: the leak checker of tests/conftest.py


@pytest.mark.parametrize("kind", KINDS)
def test_del_shutdown(kind: str) -> None:
    e = make(kind)
    res = e.map(abs, range(-5, 5))
    del e
    gc.collect()
    assert list(res) == [abs(v) for v in range(-5, 5)]


@pytest.mark.parametrize("kind", KINDS)
def test_shutdown_no_wait(kind: str) -> None:
    e = make(kind)
    res = e.map(abs, range(-5, 5))
    e.shutdown(wait=False)
    assert list(res) == [abs(v) for v in range(-5, 5)]
    e.shutdown(wait=True)


def test_thread_names_assigned() -> None:
    e = AfThreadExecutor(max_workers=5, thread_name_prefix="SpecialPool")
    list(e.map(abs, range(-5, 5)))
    names = {t.name for t in threading.enumerate() if t.name.startswith("SpecialPool")}
    e.shutdown()
    assert {f"SpecialPool-{i}" for i in range(5)} <= names
    assert all(re.fullmatch(r"SpecialPool-(\d+|timer)", n) for n in names), names
    assert not [t for t in threading.enumerate() if t.name.startswith("SpecialPool")]


def test_saturation() -> None:
    """CPython's test_saturation: 60 blocked calls on 4 workers; 4 workers, and all finish."""
    e = AfThreadExecutor(4)
    sem = threading.Semaphore(0)
    futs = [e.submit(sem.acquire) for _ in range(15 * 4)]
    wait_until(lambda: e.stats().busy == 4)
    assert (e.stats().workers, e.stats().queued) == (4, 15 * 4 - 4)
    for _ in futs:
        sem.release()
    e.shutdown(wait=True)
    assert all(f.result() is True for f in futs)


def test_max_tasks_per_child() -> None:
    e = AfProcessExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=3)
    pids = [e.submit(os.getpid).result(60) for _ in range(4)]
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert e.worker_pids() == [pids[3]]
    e.shutdown()


def test_worker_traceback_is_the_cause() -> None:
    with AfProcessExecutor(1) as e:
        future = e.submit(cf.ProcessPoolExecutorTest._test_traceback)
        with pytest.raises(RuntimeError) as info:
            future.result(60)
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert type(exc.__cause__) is aioforward.RemoteTraceback
    assert "raise RuntimeError(123) # some comment" in exc.__cause__.tb
    with cf.support.captured_stderr() as f1:
        try:
            raise exc
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
    assert "raise RuntimeError(123) # some comment" in f1.getvalue()


@pytest.mark.parametrize("kind", KINDS)
def test_nonpositive_workers(kind: str) -> None:
    for number in (0, -1):
        with pytest.raises(ValueError, match="workers must be an int >= 1"):
            make(kind, number)


def test_fork_child_of_open_pool_exits() -> None:
    """The point of CPython's test_hang_global_shutdown_lock: a process forked while a pool is
    open (multiprocessing's default start method on Linux) can still exit."""
    done = run_python("""
        import multiprocessing
        from tests.test_executor_contract import AfThreadExecutor
        if __name__ == "__main__":
            with AfThreadExecutor(1) as pool:
                pool.submit(abs, -1).result()
                child = multiprocessing.get_context("fork").Process(target=abs, args=(-1,))
                child.start()
                child.join(10)
                print("exitcode", child.exitcode)
                if child.exitcode is None:
                    child.kill()
                    child.join()
        """)
    assert done.stdout.strip() == "exitcode 0", (done.stdout, done.stderr)


def test_setting_a_future_twice() -> None:
    """CPython's test_multiple_set_result/_exception without the repr text."""
    f: aioforward.ForwardFuture[int] = aioforward.ForwardFuture()
    f.set_result(1)
    with pytest.raises(InvalidStateError, match="FINISHED: <ForwardFuture at 0x[0-9a-f]+ "):
        f.set_result(2)
    assert f.done() and f.result() == 1
    g: aioforward.ForwardFuture[int] = aioforward.ForwardFuture()
    e = ValueError()
    g.set_exception(e)
    with pytest.raises(InvalidStateError, match="state=finished raised ValueError"):
        g.set_exception(Exception())
    assert g.exception() is e


@pytest.mark.parametrize("kind", KINDS)
def test_cancelled_calls_are_done_for_wait_and_as_completed(kind: str) -> None:
    """A call cancelled while queued (the pool drops it: no executor loop ever calls
    set_running_or_notify_cancel for it) counts as done for concurrent.futures.wait and
    as_completed at once, as with the standard executors."""
    import concurrent.futures

    with make(kind, 1) as e:
        running = e.submit(time.sleep, 0.5)
        queued = e.submit(pow, 2, 8)
        assert queued.cancel()
        t0 = time.monotonic()
        done, not_done = concurrent.futures.wait([queued, running], timeout=20)
        assert (done, not_done) == ({queued, running}, set())
        assert list(concurrent.futures.as_completed([queued], timeout=5)) == [queued]
        first, _ = concurrent.futures.wait(
            [queued, e.submit(time.sleep, 1)], timeout=20, return_when="FIRST_COMPLETED"
        )
        assert first == {queued} and time.monotonic() - t0 < 4


# ------------------------------------------------------------------- deliberate differences
def test_failing_initializer_keeps_retrying() -> None:
    with AfProcessExecutor(2, initializer=cf.init_fail) as e:
        with pytest.raises(BrokenExecutor, match="error in initializer") as info:
            e.submit(cf.get_init_status).result(60)
        assert isinstance(info.value, aioforward.WorkerStartError)
        # not broken for good: submit still takes calls, and they fail the same way while the
        # initializer keeps failing
        with pytest.raises(aioforward.WorkerStartError, match="error in initializer"):
            e.submit(cf.get_init_status).result(60)
        assert not e.closed


def test_killed_worker_is_replaced() -> None:
    with AfProcessExecutor(1) as e:
        anyio.run(e.wait_ready, 60)
        (pid,) = e.worker_pids()
        fut = e.submit(time.sleep, 3)
        wait_until(fut.running)
        os.kill(pid, signal.SIGTERM)  # what CPython's p.terminate() sends
        with pytest.raises(BrokenProcessPool) as info:
            fut.result(60)
        assert isinstance(info.value, aioforward.WorkerCrashedError)
        assert e.submit(pow, 2, 8).result(60) == 256
        assert e.worker_pids() != [pid]


def test_argument_that_cannot_cross_fails_alone() -> None:
    with AfProcessExecutor(1) as e:
        assert e.submit(pow, 2, 8).result(60) == 256
        pids = e.worker_pids()
        with pytest.raises(PicklingError) as info:
            e.submit(id, cf.ErrorAtPickle())  # refused at once: nothing was sent
        assert isinstance(info.value, aioforward.SerializationError)
        with pytest.raises(UnpicklingError):
            e.submit(id, cf.ErrorAtUnpickle()).result(60)
        with pytest.raises(SystemExit):
            e.submit(id, cf.ExitAtUnpickle()).result(60)
        assert e.submit(pow, 2, 8).result(60) == 256
        assert e.worker_pids() == pids  # no worker died; the pool was never broken


def test_result_that_cannot_cross_fails_alone() -> None:
    with AfProcessExecutor(1) as e:
        assert e.submit(pow, 2, 8).result(60) == 256
        pids = e.worker_pids()
        for cls, where, what in [
            (cf.ExitAtPickle, "could not be pickled in worker", "SystemExit"),
            (UnpicklesWithError, "could not be unpickled in the parent", "UnpicklingError"),
            (cf.ExitAtUnpickle, "could not be unpickled in the parent", "SystemExit"),
        ]:
            with pytest.raises(aioforward.SerializationError, match=f"{where}.*{what}"):
                e.submit(cf._return_instance, cls).result(60)
        assert e.submit(pow, 2, 8).result(60) == 256
        assert e.worker_pids() == pids


# ------------------------------------------------------------------- applying the tables
def _own_method(cls: type, name: str) -> Any:
    """A copy of an inherited test method on ``cls`` alone, to mark without touching the
    mixin that other classes share."""
    inherited = getattr(cls, name)

    @functools.wraps(inherited)
    def method(self: Any) -> Any:
        return inherited(self)

    setattr(cls, name, method)
    return method


def _apply() -> None:
    for table, kind in [(NOT_APPLICABLE, "not applicable"), (DELIBERATE, "deliberate")]:
        for key, reason in table.items():
            cls_name, _, test = key.partition(".")
            cls = globals()[cls_name]
            if test:
                assert callable(getattr(cls, test, None)), key
                setattr(cls, test, unittest.skip(f"{kind}: {reason}")(getattr(cls, test)))
            else:
                unittest.skip(f"{kind}: {reason}")(cls)
    for key, reason in KNOWN_BUGS.items():
        mark = pytest.mark.xfail(strict=True, reason=f"aioforward bug: {reason}")
        cls_name, _, test = key.partition(".")
        if test:
            mark(_own_method(globals()[cls_name], test))
        else:
            mark(globals()[key])


_apply()
