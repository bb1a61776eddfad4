"""ProcessPool: RELIABILITY.md's process scenarios, one test each (numbers in the names)."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import anyio
import psutil
import pytest
import torch

import aioforward as af
from aioforward.pools._base import START_RETRIES

from . import models as M
from .conftest import LONG_LIVED_THREADS, assert_pool_idle, open_fds, record_reply_readers

if TYPE_CHECKING:
    from collections.abc import Iterator
from pathlib import Path

pytestmark = pytest.mark.anyio


async def ready(pool: af.ProcessPool) -> None:
    """Start the workers and wait until every one can take calls."""
    await pool.wait_ready(60)


@pytest.fixture(scope="module")
def shared() -> Iterator[af.ProcessPool]:
    """A pool for the scenarios that leave every worker alive (saves worker starts); started
    here, so that its workers, pipes and threads predate each test's leak check."""
    LONG_LIVED_THREADS.update({"aioforward-shared-supervisor", "aioforward-shared-timer"})
    with af.ProcessPool(workers=2, initializer=M.set_worker_flag, name="aioforward-shared") as p:
        anyio.run(p.wait_ready, 60)
        yield p


@pytest.fixture
def pool() -> Iterator[af.ProcessPool]:
    with af.ProcessPool(workers=2, initializer=M.set_worker_flag) as p:
        yield p


async def test_results_equal_direct_call_and_structures(shared: af.ProcessPool) -> None:
    m, x = M.Tiny(), torch.randn(3, 10)
    with torch.inference_mode():
        torch.testing.assert_close(await shared.forward(m, x), m(x))
    out, mo, plain = await shared.forward(
        M.Nested(),
        M.Point(torch.ones(2), "a"),
        {"ts": [torch.ones(1), torch.ones(70_000)]},
        scale=2.0,
    )
    assert isinstance(out, M.Output) and isinstance(mo, M.ModelOutput)
    assert out.logits.tolist() == [2.0, 2.0] and out.extra["items"][1].shape == (70_000,)
    assert mo.n == 2 and plain == [None, 3, "s"]
    assert_pool_idle(shared)


async def test_workers_do_not_repeat_torchs_numpy_warning(shared: af.ProcessPool) -> None:
    """torch without numpy warns at import; the program shows it, its workers do not again
    (every other warning gets through)."""
    missing = "Failed to initialize NumPy: No module named 'numpy'"
    assert await shared.forward(M.Warns(), missing) == 0
    assert await shared.forward(M.Warns(), "any other warning") == 1


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's policy")
async def test_workers_compute_under_sched_batch_unless_their_initializer_says_otherwise(
    shared: af.ProcessPool,
) -> None:
    """A worker woken for a call must not take the core from the event loop's thread (see
    ``batch_policy``); an initializer can choose another policy."""
    assert await shared.forward(M.Policy()) == os.SCHED_BATCH
    async with af.ProcessPool(workers=1, initializer=M.default_policy) as pool:
        assert await pool.forward(M.Policy()) == os.SCHED_OTHER


async def test_s1_exception_keeps_type_with_worker_traceback(shared: af.ProcessPool) -> None:
    pids = set(shared.worker_pids())
    with pytest.raises(ValueError, match=r"boom: \(2,\)") as info:
        await shared.forward(M.Boom(), torch.zeros(2))
    cause = info.value.__cause__
    assert isinstance(cause, af.RemoteTraceback)
    assert "worker pid" in str(cause) and "Boom" not in "" and "in forward" in str(cause)
    assert set(shared.worker_pids()) == pids  # reused, not replaced


async def test_s2_unpicklable_exception_becomes_remote_error(shared: af.ProcessPool) -> None:
    with pytest.raises(af.RemoteError, match="Unpicklable: 1-2") as info:
        await shared.forward(M.RaiseUnpicklable())
    assert info.value.type_name == "tests.models.Unpicklable"
    assert "raise Unpicklable" in info.value.remote_traceback
    if sys.version_info >= (3, 11):  # notes
        (note,) = info.value.__notes__
        assert note.startswith("tests.models.Unpicklable could not come back as itself: ")
    assert (await shared.forward(M.Pid())) in shared.worker_pids()


async def test_s3_unpicklable_module_fails_at_submit(shared: af.ProcessPool) -> None:
    m = M.Tiny()
    m.hook = lambda: None  # type: ignore[assignment]
    with pytest.raises(af.SerializationError, match=r"attribute hook \(function\).*ModuleSpec"):
        shared.submit(m, torch.zeros(1, 10))
    assert shared.stats().busy == 0

    class Local(M.Tiny):  # a subclass defined here: workers cannot import it
        pass

    with pytest.raises(
        af.SerializationError,
        match=r"class tests\.test_process\.test_s3_unpicklable_module_fails_at_submit"
        r"\.<locals>\.Local is defined inside a function.*Define it at the top level",
    ):
        shared.submit(Local(), torch.zeros(1, 10))
    outer = M.Tiny()
    outer.b = Local()  # a submodule's class: named too
    with pytest.raises(af.SerializationError, match=r"<locals>\.Local is defined inside"):
        shared.submit(outer, torch.zeros(1, 10))

    class SelfPickling(M.Tiny):  # local too, but it pickles (as fx's GraphModule does)
        def __reduce__(self) -> Any:
            return (M.Tiny, ())

    outer.b = SelfPickling()
    outer.lock = threading.Lock()  # what really cannot cross: named, not the class
    with pytest.raises(af.SerializationError, match=r"attribute lock \(lock\) cannot be"):
        shared.submit(outer, torch.zeros(1, 10))
    assert shared.stats().busy == 0


async def test_s4_bad_inputs_fail_alone_among_good_ones(shared: af.ProcessPool) -> None:
    m = M.Echo()
    good, bad = 0, 0
    futs = []
    for i in range(200):
        if i % 2:
            with pytest.raises(af.SerializationError, match="cannot be sent"):
                shared.submit(m, lambda i=i: i)
            bad += 1
        else:
            futs.append(shared.submit(m, i))
    for i, f in enumerate(futs):
        args, _ = await f
        assert args == (2 * i,)
        good += 1
    assert (good, bad) == (100, 100)


async def test_s5_input_that_kills_worker_on_unpickle(pool: af.ProcessPool) -> None:
    with pytest.raises(af.WorkerCrashedError, match="exited with code 7") as info:
        await pool.forward(M.Echo(), M.KillOnUnpickle())
    assert info.value.exitcode == 7 and info.value.module == "Echo"
    assert (await pool.forward(M.Echo(), 1))[0] == (1,)


async def test_s6_result_that_cannot_cross(shared: af.ProcessPool) -> None:
    with pytest.raises(af.SerializationError, match="could not be pickled"):
        await shared.forward(M.ReturnLambda())
    with pytest.raises(af.SerializationError, match="could not be unpickled in the parent"):
        await shared.forward(M.ReturnParentFails())
    assert (await shared.forward(M.Echo(), 5))[0] == (5,)


async def test_s7_shape_mismatch_text_reaches_caller(shared: af.ProcessPool) -> None:
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        await shared.forward(M.Tiny(), torch.zeros(2, 3))


async def test_s8_s9_special_values_and_tensors(shared: af.ProcessPool) -> None:
    base = torch.arange(1_000_000, dtype=torch.float32)
    cases = {
        "nan": torch.tensor([float("nan"), float("inf"), -float("inf")]),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "noncontig": torch.randn(300, 200).t(),
        "view": base[10:20],
        "grad": torch.ones(3, requires_grad=True) * 2,
        "bf16": torch.randn(100_000).to(torch.bfloat16),
        "bool": torch.tensor([True, False]),
    }
    (got,), _ = await shared.forward(M.Echo(), cases)
    for k, v in cases.items():
        torch.testing.assert_close(got[k], v.detach(), equal_nan=True, msg=k)
    assert got["view"].untyped_storage().nbytes() == 40  # not the 4 MB base


async def test_s10_tensor_larger_than_shared_memory_limit() -> None:
    with af.ProcessPool(workers=1, shm_limit=1 << 20) as pool:
        with pytest.raises(af.SerializationError, match=r"4194304 bytes needed.*allows 1048576"):
            pool.submit(M.Echo(), torch.zeros(1 << 20))
        assert (await pool.forward(M.Echo(), 1))[0] == (1,)


async def test_s11_many_calls_under_low_open_files_limit(shared: af.ProcessPool) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        for i in range(300):
            size = 100_000 + (i % 7) * 50_000  # through shared memory, segments regrow
            (y,), _ = await shared.forward(M.Echo(), torch.full((size,), float(i)))
            assert y[0].item() == i
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_s12_sigkill_mid_forward(pool: af.ProcessPool) -> None:
    async with anyio.create_task_group() as tg:
        other: list[object] = []

        async def run_other() -> None:
            other.append(await pool.forward(M.Sleep(0.3)))

        fut = pool.submit(M.Sleep(30))
        with anyio.fail_after(10):
            while not fut.running():
                await anyio.sleep(0.01)
            await anyio.sleep(0.2)
        tg.start_soon(run_other)
        victim = fut._item.worker.pid  # type: ignore[union-attr]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(af.WorkerCrashedError, match="SIGKILL") as info:
            await fut
        assert time.monotonic() - t0 < 1.0
        assert info.value.pid == victim and info.value.module == "Sleep"
    assert len(other) == 1  # the call on the other worker went on
    pid = await pool.forward(M.Pid())
    assert pid != victim
    with anyio.fail_after(20):
        while pool.stats().workers < 2:
            await anyio.sleep(0.05)
    assert pool.stats().restarts == 1


@pytest.mark.parametrize(("code", "words"), [(3, "exited with code 3"), (-1, "SIGSEGV")])
async def test_s13_exit_and_segfault(pool: af.ProcessPool, code: int, words: str) -> None:
    with pytest.raises(af.WorkerCrashedError, match=words):
        await pool.forward(M.Exit(code))
    assert (await pool.forward(M.Echo(), 2))[0] == (2,)


async def test_s13_a_worker_that_closed_its_pipe_costs_the_parent_no_cpu_until_it_exits(
    pool: af.ProcessPool,
) -> None:
    # Its pipe at end of file stays readable: the supervisor used to wait on it again at once,
    # and spun a core for as long as the worker took to exit (0.3 s of interpreter teardown
    # at every shutdown; here 1 s).
    await pool.wait_ready(60)
    c0 = time.process_time()
    with pytest.raises(af.WorkerCrashedError, match="exited with code 3"):
        await pool.forward(M.CloseAndLinger(1.0))
    assert time.process_time() - c0 < 0.3
    assert (await pool.forward(M.Echo(), 2))[0] == (2,)


async def test_s13_a_worker_that_closed_its_pipe_and_hangs_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aioforward.pools.process import _supervisor

    monkeypatch.setattr(_supervisor, "EOF_GRACE_S", 0.5)
    with af.ProcessPool(workers=1) as pool:
        await pool.wait_ready(60)
        t0 = time.monotonic()
        with pytest.raises(af.WorkerCrashedError, match="closed its pipe") as info:
            await pool.forward(M.CloseAndLinger(60))
        assert time.monotonic() - t0 < 5
        assert info.value.exitcode == -signal.SIGKILL
        assert (await pool.forward(M.Echo(), 2))[0] == (2,)


async def test_s14_out_of_memory_is_a_crash_with_hint(pool: af.ProcessPool) -> None:
    with pytest.raises(af.WorkerCrashedError, match="ran out of memory"):
        await pool.forward(M.Hog())
    assert (await pool.forward(M.Echo(), 3))[0] == (3,)


async def test_s15_failing_initializer_and_factory() -> None:
    t0 = time.monotonic()
    with af.ProcessPool(workers=1, initializer=M.failing_initializer) as pool:
        with pytest.raises(af.WorkerStartError, match="initializer says no"):
            await pool.forward(M.Echo(), 1)
        assert time.monotonic() - t0 < 15
        await anyio.sleep(1.0)
        assert pool.stats().restarts <= 5  # backing off, no respawn storm
    with af.ProcessPool(workers=1) as pool:
        with pytest.raises(af.WorkerStartError, match="factory says no"):
            await pool.forward(af.ModuleSpec(M.failing_factory), 1)
        spec = af.ModuleSpec(M.build_tiny, 1)
        assert (await pool.forward(spec, torch.zeros(1, 10))).shape == (1, 5)


async def test_s15_silent_death_at_every_start_fails_after_retries() -> None:
    t0 = time.monotonic()
    with af.ProcessPool(workers=1, initializer=M.exiting_initializer) as pool:
        with pytest.raises(af.WorkerStartError, match="exited with code 3"):
            await pool.forward(M.Echo(), 1)
        assert time.monotonic() - t0 < 30
        assert pool.stats().restarts >= START_RETRIES - 1


async def test_close_does_not_wait_for_a_worker_still_in_its_initializer() -> None:
    """A worker that is not ready runs no call: close() kills it instead of waiting until
    its initializer returns (up to start_timeout, 60 s by default, for one that hangs)."""
    pool = af.ProcessPool(workers=1, initializer=M.slow_initializer, initargs=(600,))
    call = pool.submit(M.Echo(), 7)
    with anyio.fail_after(30):
        while not pool.worker_pids():
            await anyio.sleep(0.01)
    pid = pool.worker_pids()[0]
    await anyio.sleep(0.5)
    t0 = time.monotonic()
    await pool.aclose()
    assert time.monotonic() - t0 < 5
    with pytest.raises(af.PoolClosedError, match="closed before the call ran"):
        await call
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_worker_killed_while_starting_is_replaced_without_failing_calls() -> None:
    """A stray SIGKILL during start (the OOM killer, an operator) is not a start failure:
    the queued call waits for the replacement instead of getting WorkerStartError."""
    with af.ProcessPool(workers=1, initializer=M.slow_initializer, initargs=(1.5,)) as pool:
        call = pool.submit(M.Echo(), 7)
        with anyio.fail_after(30):
            while not pool.worker_pids():
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # inside the initializer: not ready yet
        assert pool.stats().workers == 0
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        with anyio.fail_after(30):
            assert (await call)[0] == (7,)
        assert pool.stats().restarts == 1
        await pool.wait_ready(timeout=30)


async def test_s16_hung_module_timeout_kills_and_replaces(pool: af.ProcessPool) -> None:
    await ready(pool)
    before = set(pool.worker_pids())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await pool.forward(M.Sleep(60), timeout=0.3)
    assert time.monotonic() - t0 < 0.3 + 0.1
    with anyio.fail_after(20):
        while pool.stats().busy or pool.stats().workers < 2:
            await anyio.sleep(0.05)
    assert set(pool.worker_pids()) != before


async def test_a_kill_that_lands_after_the_reply_spares_the_next_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A timed-out call overruns its grace and the pool decides to kill its worker, but the
    reply comes in before the kill lands: that worker takes no next call (the kill used to
    fail the queued call that went to it), and the queued call runs on the replacement."""
    from aioforward.pools.process._pool import ProcessWorker

    def late_kill(self: ProcessWorker, item: Any) -> bool:  # interrupt(), preempted
        proc = self.proc
        if self.item is not item or proc is None:
            return False
        deadline = time.monotonic() + 10
        while self.item is item and time.monotonic() < deadline:
            time.sleep(0.01)  # the reply comes in meanwhile
        proc.kill()
        return True

    monkeypatch.setattr(ProcessWorker, "interrupt", late_kill)
    with af.ProcessPool(workers=1, cancel_grace=0.1) as pool:
        first = await pool.forward(M.Pid())
        slow = pool.submit_call(af.call(M.Sleep(0.6)), timeout=0.1)
        queued = pool.submit_call(af.call(M.Sleep(0.3)))  # returns its worker's pid
        with pytest.raises(TimeoutError):
            await slow
        with anyio.fail_after(30):
            assert int(await queued) != first
        assert pool.stats().overran == 1 and pool.stats().failed == 1


async def test_s17_kill_on_cancel() -> None:
    with af.ProcessPool(workers=1, kill_on_cancel=True) as pool:
        first = await pool.forward(M.Pid())
        with anyio.move_on_after(0.5) as scope:
            await pool.forward(M.Sleep(60))
        assert scope.cancelled_caught
        assert await pool.forward(M.Pid()) != first


async def test_s18_cancel_by_default_keeps_slot_until_done(pool: af.ProcessPool) -> None:
    first = await pool.forward(M.Pid())
    with anyio.move_on_after(0.3):
        await pool.forward(M.Sleep(1.0))
    assert pool.stats().busy == 1
    with anyio.fail_after(10):
        while pool.stats().busy:
            await anyio.sleep(0.05)
    assert first in pool.worker_pids()


async def test_s20_run_parallel_failure_cancels_slow_sibling(pool: af.ProcessPool) -> None:
    await ready(pool)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="boom"):
        await pool.run_parallel(af.call(M.Sleep(2.0)), af.call(M.Boom(), torch.zeros(1)))
    assert time.monotonic() - t0 < 1.5
    assert pool.stats().cancelled == 1


async def test_s21_many_callers_bounded_and_queue_full() -> None:
    with af.ProcessPool(workers=2, max_queued=5) as pool:
        await ready(pool)
        futs = [pool.submit(M.Sleep(0.2)) for _ in range(7)]
        with pytest.raises(af.QueueFullError):
            pool.submit(M.Sleep(0.0))
        assert pool.stats().busy <= 2
        for f in futs:
            await f


def test_s22_loop_ends_with_work_in_flight_then_next_loop(pool: af.ProcessPool) -> None:
    import asyncio

    async def abandon() -> None:
        asyncio.get_running_loop().create_task(pool.forward(M.Sleep(0.5)))
        await asyncio.sleep(0.1)

    asyncio.run(abandon())
    assert asyncio.run(pool.forward(M.Echo(), 9))[0] == (9,)


def test_s23_workers_exit_when_parent_is_killed(tmp_path: object) -> None:
    code = textwrap.dedent(
        """
        import sys, time, aioforward as af
        if __name__ == "__main__":
            pool = af.ProcessPool(workers=2)
            pool.submit(af.ModuleSpec(__import__("torch").nn.Identity), 1).result(60)
            print(" ".join(map(str, pool.worker_pids())), flush=True)
            time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.1)
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive
    finally:
        parent.kill()
        if parent.stdout:
            parent.stdout.close()
    # the next pool sweeps what the killed parent left in /dev/shm
    with af.ProcessPool(workers=1):
        assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"aiofwd_{parent.pid}_")]


async def test_s29_worker_floods_stderr(shared: af.ProcessPool) -> None:
    with anyio.fail_after(30):
        assert await shared.forward(M.Shout()) == 1


async def test_shared_weights_one_copy_for_all_workers(pool: af.ProcessPool) -> None:
    m = M.Big(200)
    await ready(pool)
    pids = pool.worker_pids()
    await pool.forward(M.Pid())
    await pool.forward(M.Pid())
    before = {p: psutil.Process(p).memory_full_info().uss for p in pids}
    await pool.warmup(m, example=torch.ones(1))
    grew = [psutil.Process(p).memory_full_info().uss - before[p] for p in pids]
    assert max(grew) < 50 * 2**20, grew  # each worker maps the 200 MB, none copies it


async def test_reload_ships_changed_module(shared: af.ProcessPool) -> None:
    m = M.Tiny()
    x = torch.ones(1, 10)
    y1 = await shared.forward(m, x)
    with torch.no_grad():
        m.b.bias += 1
    assert torch.equal(await shared.forward(m, x), y1)  # stale until told
    shared.reload(m)
    torch.testing.assert_close(await shared.forward(m, x), y1 + 1)


async def test_max_calls_per_worker_recycles() -> None:
    with af.ProcessPool(workers=1, max_calls_per_worker=2) as pool:
        pids = [await pool.forward(M.Pid()) for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]


def test_executor_interface_from_sync_code(shared: af.ProcessPool) -> None:
    fut = shared.submit(M.Echo(), 4)
    assert fut.result(30)[0] == (4,)
    assert list(shared.map(abs, [-1, -2, 3])) == [1, 2, 3]


def test_bad_arguments() -> None:
    for kwargs, words in [
        ({"workers": 0}, "workers"),
        ({"threads_per_worker": 0}, "threads"),
        ({"max_calls_per_worker": 0}, "max_calls"),
        ({"initializer": 3}, "initializer"),
    ]:
        with pytest.raises((ValueError, TypeError), match=words):
            af.ProcessPool(**kwargs)  # type: ignore[arg-type]


async def test_s19_cancel_before_dispatch_never_runs(shared: af.ProcessPool) -> None:
    await ready(shared)
    busy = [shared.submit(M.Sleep(0.3)) for _ in range(2)]  # both workers occupied
    queued = shared.submit(M.Exit(5))  # would kill its worker if it ever ran
    assert queued.cancel()
    with anyio.move_on_after(0.01):  # cancelled by the caller while waiting for a slot
        await shared.forward(M.Exit(6))
    for f in busy:
        await f
    pids = set(shared.worker_pids())
    assert (await shared.forward(M.Echo(), 1))[0] == (1,)
    assert set(shared.worker_pids()) == pids and shared.stats().restarts == 0
    assert_pool_idle(shared)


async def test_warmup_runs_once_on_every_worker(tmp_path: Path) -> None:
    log = tmp_path / "pids"
    with af.ProcessPool(workers=2) as pool:
        await pool.warmup(M.RecordPid(str(log)), example=torch.zeros(1))
        assert sorted(map(int, log.read_text().split())) == sorted(pool.worker_pids())


async def test_released_module_is_unmapped_in_the_worker() -> None:
    with af.ProcessPool(workers=1) as pool:
        m = M.Big(8)
        await pool.forward(m, torch.ones(1))
        (pid,) = pool.worker_pids()
        label = pool._core.backend.prefix + "m"  # type: ignore[attr-defined]  # weights' label
        assert label in Path(f"/proc/{pid}/maps").read_text()

        def parent_holds() -> bool:
            return any(label in target for target in open_fds().values())

        assert parent_holds()  # one descriptor per shipped module, for workers started later
        del m
        with anyio.fail_after(5):  # the supervisor thread may still hold the finished call
            while parent_holds():
                gc.collect()
                await anyio.sleep(0.01)
        await pool.forward(M.Echo(), 1)  # carries the drop to the worker
        assert label not in Path(f"/proc/{pid}/maps").read_text()


async def test_s30_soak_random_kills_timeouts_cancels() -> None:
    """Hundreds of calls with random kills, timeouts and cancels: every call ends with a
    result or a typed error, nothing leaks (the autouse fixture), parent memory stays flat."""
    rng = random.Random(30)
    outcomes: dict[str, int] = {}
    me = psutil.Process()
    with af.ProcessPool(workers=2) as pool:
        await pool.wait_ready(timeout=60)

        async def one(i: int) -> None:
            kind = rng.choice(["ok", "ok", "ok", "big", "timeout", "cancel", "raise"])
            try:
                if kind == "big":
                    (y,), _ = await pool.forward(M.Echo(), torch.full((200_000,), float(i)))
                    assert y[0].item() == i
                elif kind == "timeout":
                    await pool.forward(M.Sleep(5), timeout=0.05)
                elif kind == "cancel":
                    with anyio.move_on_after(0.02):
                        await pool.forward(M.Sleep(0.1))
                    kind = "cancelled"
                elif kind == "raise":
                    await pool.forward(M.Boom(), torch.zeros(1))
                else:
                    assert (await pool.forward(M.Echo(), i))[0] == (i,)
                outcome = kind
            except (TimeoutError, ValueError, af.WorkerCrashedError, af.WorkerStartError) as exc:
                # WorkerStartError: the killer hit starting workers START_RETRIES times in a row
                outcome = type(exc).__name__
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        async def killer() -> None:
            for _ in range(4):
                await anyio.sleep(0.5)
                pids = pool.worker_pids()
                if pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rng.choice(pids), signal.SIGKILL)

        rss = []
        with anyio.fail_after(120):
            for wave in range(6):
                async with anyio.create_task_group() as tg:
                    if wave in (1, 3):
                        tg.start_soon(killer)
                    for i in range(50):
                        tg.start_soon(one, i)
                gc.collect()
                rss.append(me.memory_info().rss)
            while pool.stats().busy:
                await anyio.sleep(0.05)
        assert sum(outcomes.values()) == 300, outcomes
        assert outcomes.get("ok", 0) > 50 and outcomes.get("TimeoutError", 0) > 5, outcomes
        assert rss[-1] - rss[1] < 64 * 2**20, rss  # flat after the first wave warmed up
        assert_pool_idle(pool)


async def test_awaiting_task_reads_its_reply_in_its_own_thread(
    shared: af.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task that awaits a call reads the worker's reply itself, in the loop's thread (an
    asyncio loop's ``add_reader``, trio's ``wait_readable``); for a sync caller the
    supervisor thread does."""
    readers = record_reply_readers(monkeypatch)
    x = torch.arange(4.0)
    for _ in range(3):
        (y,), _ = await shared.forward(M.Echo(), x)
        assert torch.equal(y, x)
    assert (await af.forward(M.Echo(), x, pool=shared))[0][0] is not None  # the same path
    assert (await af.AsyncModule(M.Echo(), pool=shared)(x))[0][0] is not None
    assert torch.equal(shared.submit(M.Echo(), x).result(30)[0][0], x)
    assert readers[:5] == [threading.current_thread().name] * 5
    assert readers[5] == "aioforward-shared-supervisor"


async def test_large_tensors_are_copied_off_the_event_loop(
    shared: af.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying a large input into shared memory, or a large result out of it, blocks the
    thread that does it (a 64 MiB result froze the loop for 40 ms): from LOOP_COPY_MAX bytes
    the supervisor thread copies, whether the call is awaited at once or submitted; below it
    the caller's thread does, which costs the small call no hand-off."""
    from aioforward.pools.process import _transport as tr
    from aioforward.pools.process._supervisor import LOOP_COPY_MAX

    copies: list[tuple[str, str, int]] = []  # (what, thread, bytes)
    write, loads = tr.Outbox.write, tr.loads

    def record_write(self: tr.Outbox, seg: tr.Segment) -> list[tuple[int, str, tuple[int, ...]]]:
        copies.append(("in", threading.current_thread().name, self.big_bytes()))
        return write(self, seg)

    def record_loads(data: bytes, seg: object, table: list[Any], *, copy: bool) -> object:
        if copy and table:
            copies.append(("out", threading.current_thread().name, tr.table_bytes(table)))
        return loads(data, seg, table, copy=copy)  # type: ignore[arg-type]

    monkeypatch.setattr(tr.Outbox, "write", record_write)
    monkeypatch.setattr(tr, "loads", record_loads)
    me, supervisor = threading.current_thread().name, "aioforward-shared-supervisor"
    big = torch.randn(LOOP_COPY_MAX // 4 + 16)  # just over the limit
    small = torch.randn(LOOP_COPY_MAX // 8)  # in shared memory (> inline), under the limit
    for x in (big, small):
        copies.clear()
        (y,), _ = await shared.forward(M.Echo(), x)
        assert torch.equal(y, x)
        (y,), _ = await shared.submit(M.Echo(), x)
        assert torch.equal(y, x)
        assert {what for what, _, _ in copies} == {"in", "out"}
        for what, thread, nbytes in copies:
            if nbytes >= LOOP_COPY_MAX:
                assert thread == supervisor, (what, thread, nbytes)
            elif what == "in":
                assert thread == me, (what, thread, nbytes)
            # a small result is read by the awaiting task's thread (forward), else by the
            # supervisor (submit)


async def test_a_modules_first_awaited_call_ships_it_off_the_event_loop(
    shared: af.ProcessPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module's first call copies its weights into shared memory, which froze the loop for
    140 ms with a 200 MB module here: every awaited entry point ships it in a worker thread
    first, and raises what shipping raises there. A sync submit ships in its own thread."""
    from aioforward.pools.process import _transport as tr

    shipped_in: list[threading.Thread] = []
    ship_module = tr.ship_module

    def record(*args: Any, **kwargs: Any) -> Any:
        shipped_in.append(threading.current_thread())
        return ship_module(*args, **kwargs)

    monkeypatch.setattr(tr, "ship_module", record)
    me, x = threading.current_thread(), torch.zeros(1, 10)
    m = [M.Tiny() for _ in range(8)]
    await shared.forward(m[0], x)
    await shared.run_parallel(m[1], m[2], x)
    await af.forward(m[3], x, pool=shared)
    await af.AsyncModule(m[4], pool=shared)(x)
    await shared.warmup(m[5])
    await shared.warmup(m[6], example=x)
    await shared.forward(m[0], x)  # shipped once
    assert len(shipped_in) == 7 and me not in shipped_in, shipped_in
    await shared.submit(m[7], x)
    assert shipped_in[-1] is me
    bad = M.Tiny()
    bad.hook = lambda: None  # type: ignore[assignment]
    with pytest.raises(af.SerializationError, match=r"attribute hook \(function\)"):
        await shared.forward(bad, x)
    assert shipped_in[-1] is not me
    assert (await shared.forward(m[0], x)).shape == (1, 5)


async def test_a_large_reply_handed_over_survives_its_worker_dying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop hands a large reply to the supervisor to copy out, and the worker dies before
    the supervisor gets to it: the call still ends with its result (the reply arrived), and
    the supervisor reaps and replaces the worker after."""
    from aioforward.pools.process._supervisor import LOOP_COPY_MAX, Supervisor

    call_soon = Supervisor.call_soon
    handed: list[object] = []

    def kill_first(self: Supervisor, w: Any, fn: Any) -> None:
        handed.append(fn)
        if len(handed) == 2:  # the input's copy, then the reply its task's loop read
            os.kill(w.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):  # reaped already: dead too
                while psutil.Process(w.pid).status() != psutil.STATUS_ZOMBIE:
                    time.sleep(0.01)  # its sentinel is ready before the hand-over is queued
        call_soon(self, w, fn)

    async with af.ProcessPool(workers=1) as pool:
        x = torch.randn(LOOP_COPY_MAX // 4 + 16)
        await pool.warmup(M.Echo(), example=x)
        (pid,) = pool.worker_pids()
        monkeypatch.setattr(Supervisor, "call_soon", kill_first)
        (y,), _ = await pool.forward(M.Echo(), x)
        assert torch.equal(y, x)
        assert len(handed) == 2
        monkeypatch.undo()
        with anyio.fail_after(60):
            while pool.worker_pids() in ([], [pid]) or pool.stats().workers < 1:
                await anyio.sleep(0.05)
        assert (await pool.forward(M.Echo(), x))[0][0].shape == x.shape


def test_an_idle_worker_dying_as_a_call_reserves_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle worker is killed; a submit reserves it before the supervisor reaps it, and
    sends only after: the caller gets WorkerCrashedError, the counts stay right (nothing busy
    once it ended) and the next call runs on the replacement."""
    from aioforward.pools.process._supervisor import Supervisor

    reaped, on_exit = threading.Event(), Supervisor._on_exit
    may_reap = threading.Event()

    def held_on_exit(self: Supervisor, w: Any) -> None:
        may_reap.wait(10)  # the submit below reserves the dead worker meanwhile
        on_exit(self, w)
        reaped.set()

    with af.ProcessPool(workers=1) as pool:
        m, x = M.Tiny(), torch.zeros(1, 10)
        pool.submit(m, x).result(60)
        backend = pool._core.backend
        send_call = backend.send_call

        def late_send(w: Any, item: Any) -> None:
            may_reap.set()
            assert reaped.wait(10)
            send_call(w, item)

        monkeypatch.setattr(Supervisor, "_on_exit", held_on_exit)
        monkeypatch.setattr(backend, "send_call", late_send)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        time.sleep(0.2)  # the supervisor sees the death, and waits to reap it
        fut = pool.submit(m, x)
        with pytest.raises(af.WorkerCrashedError):
            fut.result(30)
        monkeypatch.undo()
        assert pool.submit(m, x).result(60).shape == (1, 5)
        assert_pool_idle(pool)
        assert pool.stats().busy == 0


async def test_loop_blocked_on_a_call_queued_behind_its_own_does_not_deadlock() -> None:
    """A task awaits a call (its loop would read the reply); then sync code on the same loop
    blocks on a second call queued behind it. The loop cannot read the first reply, so the
    supervisor takes the read over within its watch interval and both calls finish."""
    with af.ProcessPool(workers=1) as p:
        await ready(p)
        first = anyio.Event()
        results: list[object] = []

        async def slow() -> None:
            first.set()
            results.append(await p.forward(M.Sleep(0.3)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            await first.wait()
            await anyio.sleep(0.05)  # the slow call is running, its reply owned by its task
            t0 = time.monotonic()
            (y,), _ = p.submit(M.Echo(), torch.ones(3)).result(timeout=20)  # blocks the loop
            assert torch.equal(y, torch.ones(3))
            assert time.monotonic() - t0 < 5
        assert len(results) == 1 and int(results[0]) in p.worker_pids()  # type: ignore[call-overload]
        assert p.stats().completed == 2


async def test_a_call_awaited_right_after_a_blocked_loop_takes_its_worker_back() -> None:
    """As above, and the blocked task then awaits a call at once, on the worker the blocking
    call just freed, before the first task has run again: the first task still waits on that
    worker's pipe (on trio: one task at a time may wait on a descriptor), so the supervisor
    reads the new call's reply, and all three calls return."""
    with af.ProcessPool(workers=1) as p:
        await ready(p)
        first = anyio.Event()
        results: list[object] = []
        echo = M.Echo()
        await p.warmup(echo)  # shipped: forward(echo) has no checkpoint before it sends

        async def slow() -> None:
            first.set()
            results.append(await p.forward(M.Sleep(0.3)))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                await first.wait()
                await anyio.sleep(0.05)  # the slow call is running, its reply owned by its task
                (y,), _ = p.submit(echo, torch.ones(3)).result(timeout=20)  # blocks the loop
                (z,), _ = await p.forward(echo, torch.ones(2))  # no checkpoint between
            assert torch.equal(y, torch.ones(3)) and torch.equal(z, torch.ones(2))
        assert len(results) == 1 and int(results[0]) in p.worker_pids()  # type: ignore[call-overload]
        assert p.stats().completed == 3
        assert_pool_idle(p)


FRAME_CASES = [
    torch.randn(3, 4),
    torch.randn(2, dtype=torch.float64),
    torch.randn(5, dtype=torch.float16),
    torch.randn(5, dtype=torch.bfloat16),
    torch.arange(6, dtype=torch.int64).view(2, 3),
    torch.arange(6, dtype=torch.int32),
    torch.arange(6, dtype=torch.int16),
    torch.arange(-3, 3, dtype=torch.int8),
    torch.arange(6, dtype=torch.uint8),
    torch.tensor([True, False]),
    torch.randn(3, dtype=torch.complex64),
    torch.randn(3, dtype=torch.complex128),
    torch.tensor(2.5),  # 0-dim
    torch.empty(0, 3),  # no elements
    torch.randn(4, 3).t(),  # not contiguous
    torch.randn(1000)[10:13],  # a view of a larger storage: only its bytes travel
]


async def test_small_tensor_calls_travel_in_binary_frames_exactly(
    shared: af.ProcessPool,
) -> None:
    """Plain small tensors in and out skip pickle (see _frames): every dtype, shape and
    view comes back equal, as an ordinary tensor the caller owns."""
    echo = torch.nn.Identity()
    for x in FRAME_CASES:
        y = await shared.forward(echo, x)
        assert y.dtype == x.dtype and y.shape == x.shape, x
        assert torch.equal(y, x), x
        assert type(y) is torch.Tensor and not y.requires_grad
        y.fill_(0)  # writable, ours
    two = M.Pair()
    a, b = torch.randn(2, 10), torch.randn(2, 10)
    with torch.inference_mode():
        want = two(a, b)
    torch.testing.assert_close(await shared.forward(two, a, b), want)


def test_frames_are_told_from_pickles() -> None:
    import pickle

    from aioforward.pools.process import _frames as fr

    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.dumps(af.PoolStats, protocol=proto)[0] not in (fr.CALL, fr.REPLY)
    x, y = torch.randn(2, 3), torch.arange(4)
    framed = fr.encode_small((x, y), 1 << 16)
    assert framed is not None and framed[1] is None  # all inline
    seq, key, args, kwargs = fr.read_call(fr.call_frame(9, (123, 4), framed[0]))
    assert (seq, key) == (9, (123, 4)) and torch.equal(args[0], x) and torch.equal(args[1], y)
    assert kwargs == {}
    assert fr.encode_small((x, torch.nn.Parameter(y.float())), 1 << 16) is None  # one pickled
    assert fr.encode_small((x,) * 256, 1 << 16) is None  # a count over one byte
    assert fr.encode_small((torch.nn.Parameter(x),), 1 << 16) is None  # pickled: keeps its type
    big = fr.encode_small((torch.randn(100),), 16)  # over the inline limit: shared memory
    assert big is not None and big[1] is not None and big[1].big_bytes() >= 400
    assert fr.encode_small((torch.randn(2, dtype=torch.complex64).conj(),), 1 << 16) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "nested tensors are a prototype"
        nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    assert fr.encode_small((nested,), 1 << 16) is None  # no single shape: pickled
    reply = fr.reply_frame(0.5, y, 1 << 16)
    assert reply is not None and fr.read_reply(reply)[0] == 0.5
    assert torch.equal(fr.read_reply(reply)[1], y)
    assert fr.reply_frame(0.5, torch.nn.Parameter(x), 1 << 16) is None  # an Ok, pickled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "quantized tensors are deprecated"
        quantized = torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)
    assert fr.encode_small((quantized,), 1 << 16) is None  # its dtype is not listed: pickled


def test_frames_carry_keywords_layouts_and_results_of_several_tensors() -> None:
    """Keyword arguments that are plain tensors, None, bools, ints or floats travel in the
    frame; so do a tensor's layout and requires_grad, and a result that is a tuple or list
    (nested) of distinct tensors, scalars and None. The rest is left to pickle: other
    keyword values, a tensor named twice (it must arrive as one), a NamedTuple, a result
    whose large tensors do not fit in the segment."""
    from aioforward.pools.process import _frames as fr
    from aioforward.pools.process import _transport as tr

    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last).requires_grad_()
    mask = torch.ones(2, 5, dtype=torch.bool)
    kw = {"mask": mask, "past": None, "use_cache": False, "top_k": -(1 << 63), "t": 0.7}
    framed = fr.encode_small((x,), 1 << 16, kw)
    assert framed is not None and framed[1] is None
    _, _, (y,), got = fr.read_call(fr.call_frame(1, (2, 3), framed[0]))
    assert y.stride() == x.stride() and y.requires_grad and torch.equal(y, x)
    assert got.keys() == kw.keys() and torch.equal(got.pop("mask"), mask)
    assert got == {k: v for k, v in kw.items() if k != "mask"}
    assert type(got["use_cache"]) is bool and type(got["top_k"]) is int
    for refused in (
        {"name": "a"},
        {"n": 1 << 63},
        {"m": x},  # x twice: pickled, to arrive as one tensor
        {"p": torch.nn.Parameter(x)},
        {"\udc80": 1},  # a name that is no UTF-8
    ):
        assert fr.encode_small((x,), 1 << 16, refused) is None, refused
    flags = {"a": None, "b": None, "use_cache": False, "return_dict": False, "k": 1, "j": 1}
    framed = fr.encode_small((x,), 1 << 16, flags)  # equal values, one object: still framed
    assert framed is not None and fr.read_call(fr.call_frame(1, (2, 3), framed[0]))[3] == flags
    big_mask = torch.randn(64, 64).t()  # 16 KiB over a 1,000-byte limit: in shared memory
    framed = fr.encode_small((x,), 1000, {"mask": big_mask, "scale": 0.5})
    assert framed is not None and framed[1] is not None
    seg = tr.Segment.create("aiofwd_test_kw", 1 << 16, memfd=tr.MEMFD, keep_fd=False)
    try:
        framed[1].write(seg)
        _, _, _, got = fr.read_call(fr.call_frame(1, (2, 3), framed[0]), seg)
        assert torch.equal(got["mask"], big_mask) and got["mask"].stride() == big_mask.stride()
        assert got["mask"].untyped_storage().data_ptr() == seg.buf.data_ptr()  # a view
    finally:
        seg.release()

    small, big = torch.randn(3, 2).t(), torch.randn(40, 30).t()  # big: 4,800 bytes
    result = (small, [None, (big, 3, 2.5, True)], [])
    seg = tr.Segment.create("aiofwd_test_tree", 1 << 16, memfd=tr.MEMFD, keep_fd=False)
    try:
        reply = fr.reply_frame(0.5, result, 1000, seg)
        assert reply is not None and fr.reply_shared_bytes(reply) == big.nbytes
        compute, (a, [none, (b, three, half, true)], empty) = fr.read_reply(reply, seg)
        assert (
            compute == 0.5
            and none is None
            and empty == []
            and (three, half, true) == (3, 2.5, True)
        )
        assert torch.equal(a, small) and torch.equal(b, big) and b.stride() == big.stride()
        two_big = (big, big.clone(), torch.randn(150, 100))  # 60 KB more: over 64 KiB in all
        assert fr.reply_frame(0.5, two_big[:2], 1000, seg) is not None
        seg.buf.zero_()
        assert fr.reply_frame(0.5, two_big, 1000, seg) is None  # does not fit: an Ok
        assert not seg.buf.any()  # and nothing was copied for it
        assert fr.reply_frame(0.5, (small, big), 1000, None) is None  # no segment yet
    finally:
        seg.release()
    assert fr.reply_frame(0.5, (small, small), 1 << 16) is None  # one tensor twice: pickled
    assert fr.reply_frame(0.5, M.Point(small, "a"), 1 << 16) is None  # its class: pickled
    assert fr.reply_frame(0.5, (small, "text"), 1 << 16) is None
    assert fr.reply_frame(0.5, [torch.ones(1) for _ in range(300)], 1 << 16) is None  # > 255


def test_a_tensor_met_twice_in_a_message_arrives_once_and_no_other_does() -> None:
    """The pickled path sends a tensor met again as a reference to the first, and only that
    tensor: a temporary made while pickling (here by __getstate__) is freed after, and the
    next one may get its id."""
    from aioforward.pools.process import _transport as tr

    x = torch.randn(3)
    box = tr.Outbox()
    data = box.dumps([x, x, *[M.Fresh(torch.tensor(float(i))) for i in range(6)]])
    a, b, *fresh = tr.loads(data, None, [], copy=True)
    assert a is b and torch.equal(a, x)
    assert [f.v.item() for f in fresh] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_frames_place_large_tensors_in_shared_memory() -> None:
    """Over the inline limit a tensor's bytes go to a segment (the call's arguments to the
    request segment, at the offsets the frame names, viewed there by the worker; a result
    to the response segment, copied out by the parent); a frame naming bytes outside its
    segment is refused; a result larger than the segment is left to a pickled ``Ok``."""
    from aioforward.pools.process import _frames as fr
    from aioforward.pools.process import _transport as tr

    small, big = torch.randn(2, 3), torch.randn(300, 7)  # 8,400 bytes: over a 1,000 limit
    odd = torch.arange(4000, dtype=torch.int16)[::2]  # strided: copied compactly
    framed = fr.encode_small((big, small, odd), 1000)
    assert framed is not None
    body, box = framed
    assert box is not None and len(box.big) == 2  # small stays inline
    seg = tr.Segment.create("aiofwd_test_frames", 1 << 16, memfd=tr.MEMFD, keep_fd=False)
    try:
        box.write(seg)
        _, _, args, _ = fr.read_call(fr.call_frame(1, (2, 3), body), seg)
        assert [torch.equal(a, b) for a, b in zip(args, (big, small, odd), strict=True)] == [
            True
        ] * 3
        assert args[0].untyped_storage().data_ptr() == seg.buf.data_ptr()  # a view, no copy
        with pytest.raises(ValueError, match="outside shared memory"):
            fr.read_call(fr.call_frame(1, (2, 3), body))  # no segment mapped
        reply = fr.reply_frame(0.25, big.t(), 1000, seg)
        assert reply is not None and fr.reply_shared_bytes(reply) == big.nbytes
        compute, y = fr.read_reply(reply, seg)
        assert compute == 0.25 and torch.equal(y, big.t())
        assert y.untyped_storage().data_ptr() != seg.buf.data_ptr()  # copied out: ours
        other = tr.Segment.create("aiofwd_test_other", 1 << 16, memfd=tr.MEMFD, keep_fd=False)
        try:
            with pytest.raises(ValueError, match="not mapped"):
                fr.read_reply(reply, other)  # not the segment the worker wrote to
        finally:
            other.release()
        assert fr.reply_frame(0.25, torch.randn(1 << 15), 1000, seg) is None  # 128 KB > 64 KB
        assert fr.reply_frame(0.25, big, 1000, None) is None  # no segment yet: an Ok
        assert fr.reply_shared_bytes(fr.reply_frame(0.25, small, 1000, seg) or b"") == 0
    finally:
        seg.release()


async def test_large_tensor_calls_travel_in_frames_and_segments_grow(
    shared: af.ProcessPool,
) -> None:
    """Large plain tensors in and out, of growing sizes (each growth of a segment sends a
    pickled message with its descriptor, then frames again), several at once, views and
    every listed dtype: each result equals a direct call's, as a tensor the caller owns."""
    two = M.Pair()
    echo = torch.nn.Identity()
    for n in (20_000, 20_000, 300_000, 1_000_000, 300_000):
        # b of ones: its sum is exact at any thread count (the worker runs on one thread)
        a, b = torch.randn(n, 10), torch.ones(n, 10)
        with torch.inference_mode():
            want = two(a, b)
        torch.testing.assert_close(await shared.forward(two, a, b), want)
        x = torch.randn(n * 2)[::2]
        y = await shared.forward(echo, x)
        assert torch.equal(y, x) and type(y) is torch.Tensor
        y.fill_(0)
        assert not torch.equal(y, x)  # ours, not a view of shared memory
    for dt in (torch.float16, torch.int64, torch.bool, torch.complex64):
        x = torch.ones(100_000, dtype=dt)
        assert torch.equal(await shared.forward(echo, x), x), dt


def test_a_frame_finds_its_bytes_where_ctypes_does() -> None:
    """Frames read a message's bytes at ``id(data)`` plus CPython's header offset, probed at
    import: check it against ctypes for messages of every size class."""
    from aioforward.pools.process import _frames as fr

    assert fr._OFFSET is not None  # CPython: id() is the object's address
    for n in (0, 1, 7, 100, 1000, 1 << 20):
        data = os.urandom(n)
        assert fr._address(data) == fr._buffer_address(data)


async def test_first_calls_of_a_module_from_several_threads_at_once() -> None:
    """A cold pool gets a module's first calls from threads at once (a Batcher's flusher and
    a task do this): the module is shipped once and every call runs."""
    m = M.mlp(256, 2)
    x = torch.randn(4, 256)
    with torch.inference_mode():
        want = m(x)
    with af.ProcessPool(workers=2) as pool:
        await ready(pool)
        start = threading.Barrier(4)

        def first_call() -> torch.Tensor:
            start.wait(10)
            return pool.submit(m, x).result(60)

        async with anyio.create_task_group() as tg:
            results: list[torch.Tensor] = []

            async def one() -> None:
                results.append(await anyio.to_thread.run_sync(first_call))

            for _ in range(4):
                tg.start_soon(one)
        for got in results:
            torch.testing.assert_close(got, want)
        assert pool.stats().failed == 0
