"""The pool core's lifecycle and hygiene: RELIABILITY.md scenarios 31-37 (numbers in names).

Scripts that must exit (or be killed) run in a subprocess from a temporary directory,
as a user's program would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import psutil
import pytest
import torch

import aioforward as af

from . import models as M
from .conftest import assert_pool_idle, open_fds

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def fds() -> set[str]:
    return {f"{fd}->{target}" for fd, target in open_fds().items()}


def script(tmp_path: Path, body: str, name: str = "app.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def run_script(
    path: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def start_script(path: Path, *args: str, new_session: bool = False) -> subprocess.Popen[str]:
    """Start ``path`` with its output piped; ``new_session``: a process group of its own, as
    a terminal gives a job (for Ctrl-C sent to the whole group)."""
    return subprocess.Popen(
        [sys.executable, str(path), *args],
        cwd=path.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shm_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"aiofwd_{pid}_")]


@pytest.mark.timeout(240)
async def test_s31_descriptors_back_after_many_replacements() -> None:
    """Workers replaced again and again (crashes, timeouts, kill-on-cancel): the parent's
    descriptors after close equal those before the pool."""
    before = fds()
    with af.ProcessPool(workers=2, kill_on_cancel=True) as pool:
        await pool.wait_ready(60)
        x = torch.ones(100_000)  # through shared memory: a request segment per worker
        for i in range(4):
            with pytest.raises(af.WorkerCrashedError):
                await pool.forward(M.Exit(3), x)
            with pytest.raises(TimeoutError):
                await pool.forward(M.Sleep(5), timeout=0.1)
            await pool.wait_ready(60)
            with anyio.move_on_after(0.3):
                await pool.forward(M.Sleep(5))
            (y,), _ = await pool.forward(M.Echo(), x * i)
            assert y[0].item() == i
        await pool.wait_ready(60)
        assert pool.stats().restarts >= 8
    assert fds() == before


async def test_s32_burst_of_crashes_refills_within_one_worker_start() -> None:
    with af.ProcessPool(workers=2) as pool:
        t0 = time.monotonic()
        await pool.wait_ready(60)
        one_start = time.monotonic() - t0
        for _ in range(3):  # three bursts in a row: no back-off for deaths while running
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(_expect_crash, pool)
            t0 = time.monotonic()
            await pool.wait_ready(60)
            refill = time.monotonic() - t0
            # within one worker start (measured above), with room for this VM's noise
            assert refill < 2 * one_start + 1.0, (refill, one_start)
        assert pool.stats().restarts == 6 and pool.stats().workers == 2


async def _expect_crash(pool: af.Pool) -> None:
    with pytest.raises(af.WorkerCrashedError):
        await pool.forward(M.Exit(3))


def test_s33_exit_without_close_finishes_work_quietly(tmp_path: Path) -> None:
    log = tmp_path / "ran"
    path = script(
        tmp_path,
        f"""
        import torch, aioforward as af
        from tests import models as M

        if __name__ == "__main__":
            procs = af.ProcessPool(workers=2)
            threads = af.ThreadPool(workers=1)
            procs.submit(M.Echo(), 0).result(60)
            print(" ".join(map(str, procs.worker_pids())), flush=True)
            rec = M.RecordPid({str(log)!r})
            for _ in range(4):  # two run at once, two wait in the queue
                procs.submit(M.Sleep(0.3))
                procs.submit(rec)
            threads.submit(M.Sleep(0.3))
            threads.submit(rec)
            procs.submit(M.Echo(), torch.ones(1_000_000))  # a shared-memory transfer
            # no close(), no wait: the interpreter exits here
        """,
    )
    done = run_script(path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no traceback, no warning from respawned workers
    pids = [int(p) for p in done.stdout.split()]
    assert len(log.read_text().split()) == 5  # the submitted calls all ran
    assert not any(alive(p) for p in pids)
    assert shm_of(os.getpid()) == [] and not [n for n in os.listdir("/dev/shm") if "aiofwd" in n]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("when", ["starting", "idle", "running"])
def test_ctrl_c_stops_the_program_not_its_workers(tmp_path: Path, when: str) -> None:
    """Ctrl-C in a terminal signals the whole process group. The workers ignore it, even
    while they start (no traceback of theirs, no call failed with KeyboardInterrupt), and the
    program exits at once: the calls still queued are cancelled and running ones stopped,
    not run to the end as a normal exit does."""
    path = script(
        tmp_path,
        """
        import sys, time, aioforward as af
        from tests import models as M

        if __name__ == "__main__":
            pool = af.ProcessPool(workers=2)
            if sys.argv[1] == "starting":
                first = pool.submit(M.Echo(), 0)  # starts the workers
                print("go", flush=True)
                first.result(60)
            elif sys.argv[1] == "idle":
                pool.submit(M.Echo(), 0).result(60)
                print(" ".join(map(str, pool.worker_pids())), flush=True)
                print("go", flush=True)
                time.sleep(60)
            else:
                pool.submit(M.Echo(), 0).result(60)
                print(" ".join(map(str, pool.worker_pids())), flush=True)
                calls = [pool.submit(M.Sleep(0.5)) for _ in range(40)]  # 10 s of work
                print("go", flush=True)
                for f in calls:
                    f.result()
        """,
    )
    proc = start_script(path, when, new_session=True)
    assert proc.stdout is not None
    pids = []
    line = proc.stdout.readline()
    if when != "starting":
        pids = [int(p) for p in line.split()]
        line = proc.stdout.readline()
        time.sleep(0.3)  # running: two calls running, 38 queued
    assert line == "go\n"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode in (-signal.SIGINT, 130), err
    assert err.count("Traceback") == 1 and err.rstrip().endswith("KeyboardInterrupt"), err
    assert "aioforward-process-worker" not in err  # no worker printed a traceback
    assert "worker pid" not in err  # no call failed with the worker's KeyboardInterrupt
    assert took < 5, f"{took:.1f} s to exit after Ctrl-C"
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


@pytest.mark.timeout(90)
def test_every_worker_imports_the_main_module_with_sigint_blocked(tmp_path: Path) -> None:
    """The first spawn of a program starts multiprocessing's resource tracker, which unblocks
    SIGINT in the spawning thread: the first worker then imported the main module (and torch,
    a second or more) open to a Ctrl-C, and printed a KeyboardInterrupt traceback."""
    log = tmp_path / "masks"
    path = script(
        tmp_path,
        f"""
        import os, signal
        if __name__ == "__mp_main__":  # a worker, importing this module
            blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{blocked}}\\n")
        import aioforward as af
        from tests import models as M

        if __name__ == "__main__":
            with af.ProcessPool(workers=2) as pool:
                for _ in range(4):
                    pool.submit(M.Echo(), 0).result(60)
        """,
    )
    done = run_script(path)
    assert done.returncode == 0, done.stderr
    masks = log.read_text().split()
    assert len(masks) == 4 and masks[1::2] == ["True", "True"], masks


@pytest.mark.timeout(90)
def test_ctrl_c_again_leaves_a_thread_that_never_returns(tmp_path: Path) -> None:
    """A ThreadPool's thread cannot be stopped inside a module that never reaches a block
    boundary: after the first Ctrl-C the exit waits for it; the second ends the program at
    once, as with the standard ThreadPoolExecutor (it used to wait again, for ever)."""
    path = script(
        tmp_path,
        """
        import asyncio, aioforward as af
        from tests import models as M

        async def main():
            pool = af.ThreadPool(workers=2)
            print("go", flush=True)
            await asyncio.gather(*[pool.forward(M.Sleep(3600)) for _ in range(3)])

        if __name__ == "__main__":
            asyncio.run(main())
        """,
    )
    proc = start_script(path, new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "go\n"
    time.sleep(0.5)  # two calls running, one queued
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)  # the program ended with KeyboardInterrupt; its exit waits for the threads
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    ended_within(proc, 5)


def ended_within(proc: subprocess.Popen[str], seconds: float) -> None:
    """``proc``, just sent Ctrl-C, ends within ``seconds`` with KeyboardInterrupt (or is
    killed, failing the test, leaving nothing behind)."""
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:  # it hangs: fail, leaving nothing behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert time.monotonic() - t0 < seconds
    assert proc.returncode in (-signal.SIGINT, 130), err
    assert err.rstrip().endswith("KeyboardInterrupt"), err


def test_ctrl_c_ends_an_async_with_block_whose_thread_never_returns(tmp_path: Path) -> None:
    """In ``async with ThreadPool()`` under asyncio.run, Ctrl-C cancels the task, whose
    ``aclose`` waits for the stuck thread; the next raises KeyboardInterrupt and the exit
    waits for it; the one after ends the program. It took a fourth: the thread that runs
    ``aclose`` went on waiting, and the exit joins it (a stranger's trial)."""
    path = script(
        tmp_path,
        """
        import asyncio, aioforward as af
        from tests import models as M

        async def main():
            async with af.ThreadPool(workers=1) as pool:
                print("go", flush=True)
                await pool.forward(M.Sleep(3600))

        if __name__ == "__main__":
            asyncio.run(main())
        """,
    )
    proc = start_script(path, new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "go\n"
    time.sleep(0.5)
    for _ in range(2):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None  # a thread in time.sleep holds the close, then the exit
    os.killpg(proc.pid, signal.SIGINT)
    ended_within(proc, 5)


@pytest.mark.timeout(90)
def test_what_workers_cannot_import_is_named_with_the_fix(tmp_path: Path) -> None:
    """A class or function defined under the main guard exists in the parent only: a worker
    imports the script without running that block. The call fails with SerializationError
    saying so (not a bare AttributeError about ``__mp_main__``), the worker serves on, and an
    exception class of the script arrives named as the user wrote it."""
    path = script(
        tmp_path,
        """
        import asyncio, torch, aioforward as af

        class Custom(Exception):  # importable, but not rebuilt from its args
            def __init__(self, a, b):
                super().__init__(a)

        class Raiser(torch.nn.Module):
            def forward(self, x):
                raise Custom("custom", 2)

        if __name__ == "__main__":
            class Net(torch.nn.Module):
                def forward(self, x):
                    return x + 1

            def build():
                return Net()

            async def main():
                async with af.ProcessPool(workers=1) as pool:
                    for call in (
                        lambda: pool.forward(Net(), torch.ones(1)),
                        lambda: pool.forward(af.ModuleSpec(build), torch.ones(1)),
                        lambda: pool.forward(Raiser(), torch.ones(1)),
                    ):
                        try:
                            await call()
                        except Exception as exc:
                            print(type(exc).__name__, "|", exc)
                    print("then", await pool.forward(torch.nn.Identity(), torch.ones(1)))

            asyncio.run(main())
        """,
    )
    done = run_script(path, timeout=80)
    assert done.returncode == 0, done.stderr
    net, spec, custom, then = done.stdout.splitlines()
    for line, name in ((net, "Net"), (spec, "build")):
        assert line.startswith("SerializationError | "), line
        assert f"Can't get attribute '{name}'" in line and "not under that block" in line
    assert custom == "RemoteError | __main__.Custom: custom"
    assert then == "then tensor([1.])"


@pytest.mark.timeout(60)
def test_a_script_read_from_stdin_gets_one_clear_error(tmp_path: Path) -> None:
    """Spawned workers import the main module from its file; a script piped to ``python -``
    has none. One error at construction, instead of each worker's traceback."""
    done = subprocess.run(
        [sys.executable, "-"],
        input="import aioforward as af\naf.ProcessPool(workers=2)\n",
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1
    assert done.stderr.count("Traceback") == 1, done.stderr
    assert done.stderr.rstrip().endswith(
        "RuntimeError: a ProcessPool cannot start workers here: the program's main module was "
        "read from '<stdin>', not from a file, and each worker process imports the main module "
        "from its file; save the script to a file and run that (or use a ThreadPool)"
    ), done.stderr


def test_s33_sigterm_to_a_server_with_an_open_pool(tmp_path: Path) -> None:
    """A server that exits on SIGTERM (as uvicorn does) with its pool never closed."""
    path = script(
        tmp_path,
        """
        import signal, sys, time, torch, aioforward as af
        from tests import models as M

        def main() -> None:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a graceful server exit
            pool = af.ProcessPool(workers=2)
            pool.submit(M.Echo(), torch.ones(500_000)).result(60)
            pool.submit(M.Sleep(0.5))  # still running when the signal comes
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(60)

        if __name__ == "__main__":
            main()
        """,
    )
    proc = start_script(path)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == "", err
    assert not any(alive(p) for p in pids)
    assert shm_of(proc.pid) == []


def test_s34_parent_sigkilled_leaves_nothing_named(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import os, sys, time, torch, aioforward as af
        from tests import models as M

        if __name__ == "__main__":
            pool = af.ProcessPool(workers=2)
            for _ in range(3):
                pool.submit(M.Echo(), torch.ones(2_000_000)).result(60)  # 8 MB each way
            pool.submit(M.Big(16), torch.ones(1)).result(60)  # weights in shared memory
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            print(sorted(n for n in os.listdir("/dev/shm") if n.startswith("aiofwd")), flush=True)
            time.sleep(60)
        """,
    )
    proc = subprocess.Popen(
        [sys.executable, str(path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    named = proc.stdout.readline().strip()
    proc.kill()
    proc.communicate(timeout=10)
    assert named == "[]"  # memfd segments: nothing was ever named in /dev/shm
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids):  # workers notice the parent's death by themselves
        assert time.monotonic() < deadline, pids
        time.sleep(0.1)


def test_named_segments_fallback_round_trip_and_sweep(tmp_path: Path) -> None:
    """Where memfd is missing (macOS), or with AIOFORWARD_SHM=named: named segments,
    unlinked at close, and swept by the next pool after a parent was SIGKILLed."""
    path = script(
        tmp_path,
        """
        import os, sys, time, torch, aioforward as af
        from tests import models as M

        if __name__ == "__main__":
            with af.ProcessPool(workers=1) as pool:
                x = torch.arange(300_000.0)
                (y,), _ = pool.submit(M.Echo(), x).result(60)
                assert torch.equal(y, x)
                assert any(n.startswith(f"aiofwd_{os.getpid()}_") for n in os.listdir("/dev/shm"))
                if sys.argv[-1] == "kill":
                    os.kill(os.getpid(), 9)
            mine = f"aiofwd_{os.getpid()}_"
            print(sorted(n for n in os.listdir("/dev/shm") if n.startswith(mine)))
        """,
    )
    env = {"AIOFORWARD_SHM": "named"}
    done = run_script(path, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    killed = subprocess.run(
        [sys.executable, str(path), "kill"],
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    assert killed.returncode == -signal.SIGKILL
    left = [n for n in os.listdir("/dev/shm") if n.startswith("aiofwd_")]
    assert left  # the killed parent left its segments behind
    done = run_script(path, env=env)  # the next pool (named mode) sweeps them at start
    assert done.returncode == 0, done.stderr
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("aiofwd_")]


def test_s35_pool_at_the_top_of_an_app_module() -> None:
    """The workers import the app module to unpickle its model class, which constructs the
    module-level pool there too: that pool starts nothing, and calls work."""
    import asyncio

    from . import app_module

    try:
        y, inner_pool_idle = asyncio.run(
            app_module.pool.forward(app_module.AppModel(), torch.ones(3, 4))
        )
        assert y.shape == (3, 2) and inner_pool_idle
    finally:
        app_module.pool.close()
    assert_pool_idle(app_module.pool)


def test_s36_missing_main_guard_names_the_guard(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import asyncio, torch, aioforward as af

        pool = af.ProcessPool(workers=2)
        print(asyncio.run(pool.forward(torch.nn.Linear(2, 2), torch.ones(1, 2))))
        """,
        name="unguarded.py",
    )
    t0 = time.monotonic()
    done = run_script(path)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1
    assert 'if __name__ == "__main__":' in done.stderr, done.stderr
    assert done.stderr.count("Traceback") == 1, done.stderr  # no storm of worker tracebacks
    assert "WorkerStartError" in done.stderr
    # a spawned worker imports torch and the script before it can tell: seconds, not a storm
    assert elapsed < 30, elapsed


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"start_timeout": "60"}, TypeError, "start_timeout must be a number > 0, got '60'"),
        ({"start_timeout": -1}, ValueError, "start_timeout must be a number > 0, got -1"),
        ({"seed": "x"}, TypeError, "seed must be an int or None, got 'x'"),
        ({"initargs": 5}, TypeError, r"initargs must be a tuple .* initargs=\(5,\)"),
        ({"initializer": 5}, TypeError, "initializer must be callable"),
        ({"kill_on_cancel": "yes"}, TypeError, "kill_on_cancel must be a bool"),
        ({"threads_per_worker": 0}, ValueError, "threads_per_worker must be an int >= 1"),
        ({"inline_bytes": -1}, ValueError, "inline_bytes"),
        ({"shm_limit": "1G"}, TypeError, "shm_limit"),
        ({"max_calls_per_worker": 0}, ValueError, "max_calls_per_worker"),
        ({"name": 3}, TypeError, "name must be a str"),
    ],
)
def test_s37_process_pool_arguments_checked_at_construction(
    kwargs: dict[str, object], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        af.ProcessPool(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"grad": "no"}, TypeError, "grad must be a bool, got 'no'"),
        ({"threads_per_worker": 1.5}, TypeError, "threads_per_worker"),
    ],
)
def test_s37_thread_pool_arguments_checked_at_construction(
    kwargs: dict[str, object], error: type, words: str
) -> None:
    with pytest.raises(error, match=words):
        af.ThreadPool(**kwargs)  # type: ignore[arg-type]


async def test_s37_timeouts_are_numbers() -> None:
    async with af.ThreadPool(workers=1) as pool:
        with pytest.raises(TypeError, match="timeout must be a number >= 0 or None, got True"):
            await pool.forward(M.Echo(), 1, timeout=True)
        with pytest.raises(ValueError, match="timeout must be a number >= 0 or None, got -1"):
            await pool.wait_ready(timeout=-1)
        with pytest.raises(TypeError, match="timeout"):
            await af.forward(M.Echo(), 1, pool=pool, timeout="1")


async def test_wait_ready_timeout_has_a_message() -> None:
    with af.ProcessPool(workers=1, initializer=M.slow_initializer, initargs=(3,)) as pool:
        with pytest.raises(TimeoutError, match="0 of 1 workers ready after 0.2 s"):
            await pool.wait_ready(timeout=0.2)


def test_submit_from_an_atexit_hook_is_refused(tmp_path: Path) -> None:
    path = script(
        tmp_path,
        """
        import atexit, aioforward as af
        from tests import models as M

        pool = af.ThreadPool(workers=1)

        @atexit.register
        def late() -> None:
            try:
                pool.submit(M.Echo(), 1)
            except RuntimeError as exc:
                print(type(exc).__name__, exc)

        if __name__ == "__main__":
            pool.submit(M.Echo(), 0).result(30)
        """,
    )
    done = run_script(path)
    assert done.returncode == 0, done.stderr
    assert "interpreter shutdown" in done.stdout or "closed" in done.stdout, done.stdout


async def test_default_pool_installed_and_closed_is_not_replaced_silently() -> None:
    pool = af.ThreadPool(workers=1)
    af.set_default_pool(pool)
    try:
        pool.close()
        with pytest.raises(af.PoolClosedError, match=r"set_default_pool\(None\)"):
            await af.forward(M.Echo(), 1)
        af.set_default_pool(None)
        assert (await af.forward(M.Echo(), 2))[0] == (2,)  # back to the built-in pool
    finally:
        af.set_default_pool(None)


async def test_run_parallel_names_a_call_among_modules() -> None:
    m = M.Tiny()
    with pytest.raises(TypeError, match=r"argument 1 is aioforward.call\(Tiny, ...\)"):
        await af.run_parallel(m, af.call(m, torch.zeros(1, 10)))


async def test_close_does_not_wait_for_an_abandoned_process_call() -> None:
    pool = af.ProcessPool(workers=1)
    await pool.wait_ready(60)
    with anyio.move_on_after(0.3):
        await pool.forward(M.Sleep(30))  # cancelled: abandoned, still running in the worker
    assert pool.stats().busy == 1
    t0 = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - t0 < 5  # killed, not waited for
    assert pool.stats().busy == 0


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_close_says_which_running_calls_it_waits_for(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close held by a call that does not return says so once, naming the call."""
    import aioforward.pools._base as base

    monkeypatch.setattr(base, "CLOSE_WARN_S", 0.5)
    pool = af.ThreadPool(1) if kind == "thread" else af.ProcessPool(1)
    fut = pool.submit(M.Sleep(2.0))
    while not pool.stats().busy:
        time.sleep(0.01)
    killed = " or has its worker killed" if kind == "process" else ""
    with pytest.warns(RuntimeWarning) as caught:
        pool.close()
    [w] = caught  # once
    assert str(w.message).startswith(
        f"aioforward-{kind}: closing has waited 0.5 s for 1 running call(s) to return: Sleep ("
    )
    assert str(w.message).endswith(f"stops at its next block boundary{killed}")
    assert fut.result(0) is not None  # it was waited for, not stopped
