"""The process pool's pipe: the message framing it shares with ``multiprocessing``, and the
event loop's watch on a worker's pipe, kept from call to call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import anyio
import psutil
import pytest
import torch

import aioforward as af
from aioforward.pools.process import _transport as tr

from . import models as M
from .conftest import open_fds, record_reply_readers

pytestmark = pytest.mark.timeout(120)

SIZES = [0, 1, 100, 16384, 16385, 300_000]  # around the one-write limit, and many reads


@pytest.fixture
def pair() -> tuple[Connection, Connection]:
    a, b = socket.socketpair()
    ca, cb = Connection(a.detach()), Connection(b.detach())
    yield ca, cb
    ca.close()
    cb.close()


@pytest.mark.parametrize("size", SIZES)
def test_send_message_is_read_by_connection_and_back(
    pair: tuple[Connection, Connection], size: int
) -> None:
    a, b = pair
    data = os.urandom(size)
    done: list[bytes] = []
    # a large message fills the socket's buffer: read it while it is written
    reader = threading.Thread(target=lambda: done.append(b.recv_bytes()))
    reader.start()
    tr.send_message(a.fileno(), data)
    reader.join(30)
    assert done == [data]
    writer = threading.Thread(target=b.send_bytes, args=(data,))
    writer.start()
    assert tr.recv_message(a.fileno()) == data
    writer.join(30)


def test_recv_message_joins_short_reads(pair: tuple[Connection, Connection]) -> None:
    """A message that arrives in pieces (the length split too) is read whole."""
    a, b = pair
    data = os.urandom(5000)
    whole = len(data).to_bytes(4, "big") + data
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(tr.recv_message(a.fileno())))
    reader.start()
    for i in range(0, len(whole), 1999):
        os.write(b.fileno(), whole[i : i + 1999])
    reader.join(30)
    assert got == [data]


def test_recv_message_at_end_of_file_raises_eof(pair: tuple[Connection, Connection]) -> None:
    a, b = pair
    os.write(b.fileno(), (10).to_bytes(4, "big") + b"abc")  # cut inside the message
    b.close()
    with pytest.raises(EOFError):
        tr.recv_message(a.fileno())


@pytest.mark.anyio
async def test_one_watch_serves_a_loops_calls_and_ends_at_close(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    """On asyncio and uvloop the loop watches a worker's pipe once for all its calls (one
    ``add_reader``, not one per call); on trio each awaiting task waits on the pipe itself
    (``wait_readable``), with no watch kept. After the pool closes no watch is left, and
    the descriptors are back."""
    before = open_fds()
    m, x = M.Tiny(), torch.randn(1, 10)
    with torch.no_grad():
        expected = m(x)
    async with af.ProcessPool(workers=1) as pool:
        await pool.wait_ready(60)
        backend = pool._core.backend
        seen = set()
        for _ in range(20):
            torch.testing.assert_close(await pool.forward(m, x), expected)
            seen.update(backend.watches)  # type: ignore[attr-defined]
        assert len(seen) == (0 if anyio_backend[0] == "trio" else 1)
    assert not backend.watches  # type: ignore[attr-defined]
    assert open_fds() == before


def test_a_second_loop_is_served_while_another_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two loops in two threads take turns on one worker: the first keeps its watch; the
    second's calls are read by the supervisor meanwhile, and every call returns."""
    readers = record_reply_readers(monkeypatch)
    pool = af.ProcessPool(workers=1, name="pipe-test")
    m, x = M.Tiny(), torch.randn(1, 10)
    with torch.no_grad():
        expected = m(x)
    try:
        first_done = threading.Event()
        second_done = threading.Event()
        results: list[object] = []

        def run_loop(n: int, wait_for: threading.Event | None, then: threading.Event) -> None:
            async def main() -> None:
                await pool.wait_ready(60)
                results.extend([await pool.forward(m, x) for _ in range(n)])
                then.set()
                if wait_for is not None:  # stay open (and watching) until the other is done
                    while not wait_for.is_set():
                        await asyncio.sleep(0.01)

            asyncio.run(main())

        a = threading.Thread(target=run_loop, args=(5, second_done, first_done), name="loop-a")
        a.start()
        assert first_done.wait(60)
        b = threading.Thread(target=run_loop, args=(5, None, second_done), name="loop-b")
        b.start()
        b.join(60)
        a.join(60)
        assert not a.is_alive() and not b.is_alive()
        assert len(results) == 10
        for y in results:
            torch.testing.assert_close(y, expected)
        assert readers[-10:-5] == ["loop-a"] * 5, readers  # its task read each reply
        # a's loop watches the pipe still: the supervisor reads b's first reply; a's loop
        # ends its watch if it sees that reply arrive, and b's loop may then read its own
        assert readers[-5] == "pipe-test-supervisor", readers
        assert set(readers[-4:]) <= {"pipe-test-supervisor", "loop-b"}, readers
    finally:
        pool.shutdown()


def test_a_trio_task_reads_its_replies_while_an_asyncio_loop_watches_the_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An asyncio loop in one thread keeps its watch on a worker's pipe; a trio run in
    another then calls the same worker: its task reads each reply itself (the asyncio loop,
    woken too, ends its watch), every call returns, and the descriptors are back after."""
    import trio

    readers = record_reply_readers(monkeypatch)
    before = open_fds()
    pool = af.ProcessPool(workers=1, name="mixed")
    m, x = M.Tiny(), torch.randn(1, 10)
    with torch.no_grad():
        expected = m(x)
    try:
        watching, trio_done = threading.Event(), threading.Event()
        results: list[object] = []

        async def asyncio_calls() -> None:
            await pool.wait_ready(60)
            results.extend([await pool.forward(m, x) for _ in range(5)])
            watching.set()
            while not trio_done.is_set():  # stay open, watching the pipe
                await asyncio.sleep(0.01)

        async def trio_calls() -> None:
            with trio.fail_after(60):
                results.extend([await pool.forward(m, x) for _ in range(5)])

        a = threading.Thread(target=asyncio.run, args=(asyncio_calls(),), name="loop-a")
        a.start()
        assert watching.wait(60)
        assert pool._core.backend.watches  # type: ignore[attr-defined]
        b = threading.Thread(target=trio.run, args=(trio_calls,), name="loop-b")
        b.start()
        b.join(60)
        trio_done.set()
        a.join(60)
        assert not a.is_alive() and not b.is_alive()
        assert len(results) == 10
        for y in results:
            torch.testing.assert_close(y, expected)
        assert readers[-10:] == ["loop-a"] * 5 + ["loop-b"] * 5, readers
    finally:
        pool.shutdown()
    assert open_fds() == before


@pytest.mark.anyio
async def test_tasks_of_one_loop_sharing_workers_never_wait_for_the_supervisor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks of one loop calling again and again, each on whichever worker is free (two
    replies read in one turn of the loop swap the workers): the loop's thread reads every
    reply itself; none waits for the supervisor's takeover of unread replies."""
    from aioforward.pools.process import _supervisor

    monkeypatch.setattr(_supervisor, "WATCH_INTERVAL", 2.0)  # a missed reply: read late

    m = M.Tiny()
    xs = [torch.randn(1, 10) for _ in range(2)]
    with torch.no_grad():
        expected = [m(x) for x in xs]

    async def calls(i: int) -> None:
        for _ in range(300):
            torch.testing.assert_close(await pool.forward(m, xs[i]), expected[i])

    async with af.ProcessPool(workers=2, name="sharing") as pool:
        await pool.wait_ready(60)
        readers = record_reply_readers(monkeypatch)
        async with anyio.create_task_group() as tg:
            for i in range(len(xs)):
                tg.start_soon(calls, i)
    assert len(readers) == 600
    here = threading.current_thread().name
    assert readers.count(here) == 600, sorted(set(readers))


def test_readable_takes_descriptors_from_1024_up() -> None:
    """``select`` refuses them; a server with many sockets has them."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1100:
        pytest.skip(f"the descriptor limit here is {soft}, too low to open descriptor 1100")
    r, w = os.pipe()
    high = os.dup2(r, 1100)
    try:
        assert not tr.readable(high)
        os.write(w, b"x")
        assert tr.readable(high)
    finally:
        for fd in (r, w, high):
            os.close(fd)


@pytest.mark.anyio
async def test_run_parallel_replies_are_read_by_the_awaiting_loop(
    anyio_backend: tuple[str, dict[str, object]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_parallel`` on a process pool: on asyncio and uvloop the loop that awaits the
    calls reads every reply itself (small results in frames, 1 MB ones through shared
    memory), with no hand-off from the supervisor; on trio the supervisor reads them."""
    from aioforward.pools.process import _supervisor

    monkeypatch.setattr(_supervisor, "WATCH_INTERVAL", 30.0)  # a missed reply would hang
    m1, m2 = M.Tiny(), M.Tiny()
    small = torch.randn(1, 10)
    big = torch.randn(256, 1024)  # 1 MB in, 1 MB out (identity-shaped modules below)
    s1, s2 = torch.nn.Identity(), torch.nn.ReLU()
    with torch.no_grad():
        expected = (m1(small), m2(small))
    async with af.ProcessPool(workers=2, name="gather") as pool:
        await pool.warmup(m1, m2, s1, s2, example=None)
        readers = record_reply_readers(monkeypatch)
        for _ in range(10):
            with anyio.fail_after(20):
                a, b = await pool.run_parallel(m1, m2, small)
                y1, y2 = await pool.run_parallel(s1, s2, big)
            torch.testing.assert_close((a, b), expected)
            torch.testing.assert_close(y1, big)
            torch.testing.assert_close(y2, big.relu())
    assert len(readers) == 40
    here = threading.current_thread().name
    expected_reader = "gather-supervisor" if anyio_backend[0] == "trio" else here
    assert readers.count(expected_reader) == 40, sorted(set(readers))


@pytest.mark.anyio
async def test_run_parallel_whose_second_call_cannot_be_sent_lets_the_first_worker_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second call fails in submit (an argument that cannot be pickled): the first,
    already sent, is cancelled, and its worker's pipe is let go at once, so that the next
    call there is read as usual rather than after the supervisor's takeover of a reply
    nobody reads."""
    from aioforward.pools.process import _supervisor

    monkeypatch.setattr(_supervisor, "WATCH_INTERVAL", 30.0)
    m, x = M.Tiny(), torch.randn(1, 10)
    async with af.ProcessPool(workers=1) as pool:
        await pool.warmup(m, example=x)
        with pytest.raises(af.SerializationError, match="cannot be sent"):
            await pool.run_parallel(af.call(m, x), af.call(m, x, extra=lambda: 0))
        (w,) = pool._core._all  # type: ignore[attr-defined]
        assert w.reader is None
        with anyio.fail_after(20):
            for _ in range(3):
                torch.testing.assert_close(await pool.forward(m, x), m(x).detach())


def _eventfd_fds(pid: int) -> list[int]:
    """The eventfds process ``pid`` holds open."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]":
                found.append(int(fd))
    return found


def _eventfds(pid: int) -> int:
    """How many eventfds process ``pid`` holds open."""
    return len(_eventfd_fds(pid))


def _waits_on(pid: int) -> int | None:
    """The descriptor process ``pid`` (or thread: a native thread id) is blocked reading (the
    first argument of the system call it sleeps in), or None while it runs."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    if len(fields) < 2 or fields[0] == "running":
        return None
    return int(fields[1], 16)


def _eventfd_of(pid: int) -> int:
    (fd,) = _eventfd_fds(pid)
    return fd


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/PID/syscall")
@pytest.mark.anyio
async def test_idle_workers_wait_on_their_eventfd_after_stale_counts() -> None:
    """A stream's credits reach the worker while it runs, and each leaves a count on its
    eventfd that no wait took: afterwards the idle workers still sleep on their eventfds,
    not on their pipes (a worker that read its pipe after a stale count would wait there
    ever after, each message's own count going stale in turn)."""
    m, x = M.Tiny(), torch.randn(1, 10)
    async with af.ProcessPool(workers=2) as pool:
        await pool.warmup(m, example=x)
        with anyio.fail_after(30):
            for _ in range(3):
                assert [y async for y in pool.stream(M.count_slowly, 20, 0.0, buffer=2)] == (
                    list(range(20))
                )
                await pool.run_parallel(m, m, x)
            for _ in range(10):
                await pool.forward(m, x)
            pids = pool.worker_pids()
            want = {pid: _eventfd_of(pid) for pid in pids}
            got: dict[int, int | None] = {}
            while True:  # until both sleep (a woken worker reads "running")
                got = {pid: _waits_on(pid) for pid in pids}
                if None not in got.values():
                    break
                await anyio.sleep(0.01)
        assert got == want


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux's")
@pytest.mark.anyio
async def test_workers_sleep_on_an_eventfd_the_parent_writes_after_each_message() -> None:
    """Each worker sleeps on an eventfd of its own between calls (the parent's writes to it
    are not "sync" wake-ups: see _Server.serve). The parent holds one per live worker, gives
    a replaced worker's back, and none is left after close; calls, streams, cancels and the
    stop at close all wake the worker."""
    before = _eventfds(os.getpid())
    m, x = M.Tiny(), torch.randn(1, 10)
    async with af.ProcessPool(workers=2) as pool:
        await pool.warmup(m, example=x)
        assert _eventfds(os.getpid()) == before + 2
        for pid in pool.worker_pids():
            assert _eventfds(pid) == 1
        for _ in range(20):
            with anyio.fail_after(20):
                await pool.run_parallel(m, m, x)
                got = [y async for y in pool.stream(M.count_slowly, 30, 0.0, buffer=2)]
                assert got == list(range(30))
        os.kill(pool.worker_pids()[0], 9)
        with anyio.fail_after(60):
            while len(pool.worker_pids()) < 2 or pool.stats().restarts < 1:
                await anyio.sleep(0.05)
            await pool.wait_ready(60)
        await pool.forward(m, x)
        assert _eventfds(os.getpid()) == before + 2
    assert _eventfds(os.getpid()) == before


def _sleeps(pid: int) -> int:
    """How many times process ``pid`` has slept (blocked in a wait)."""
    return int(psutil.Process(pid).num_ctx_switches().voluntary)


def _cpu_s(pid: int) -> float:
    """The CPU time process ``pid`` has used, all threads."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux's")
@pytest.mark.anyio
async def test_a_call_sent_right_after_the_last_reaches_a_worker_awake() -> None:
    """After a short call an idle worker looks at its pipe for a moment before it sleeps on
    its eventfd (_worker._spin): calls awaited one after another mostly reach it awake.
    Asleep between calls, it would sleep once per call. (That the worker looks, and when,
    is tested on its own below, without timing.)"""
    m, x = M.Tiny(), torch.randn(1, 10)
    calls = 300
    async with af.ProcessPool(workers=1) as pool:
        await pool.warmup(m, example=x)
        (pid,) = pool.worker_pids()
        with anyio.fail_after(30):
            for _ in range(50):
                await pool.forward(m, x)
            before = _sleeps(pid)
            for _ in range(calls):
                await pool.forward(m, x)
            slept = _sleeps(pid) - before
    assert slept < calls // 2, f"the worker slept {slept} times in {calls} calls"


@pytest.mark.skipif(not Path("/proc/self/syscall").exists(), reason="needs /proc/PID/syscall")
@pytest.mark.timeout(60)
def test_a_worker_looks_for_its_next_call_only_after_a_short_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call of 0.5 ms or more pays its wake-up in a small part of its time, and a worker
    looking for the next call counts as load on its core: the worker looks (_worker._spin)
    after a short call's reply only, not after a long call, a call that raised or another
    message. The worker's loop runs in a thread here, on a socket pair and an eventfd, and
    each step waits until it sleeps on the eventfd, so the order of events is fixed."""
    import multiprocessing
    import pickle

    from aioforward.pools.process import _frames as fr
    from aioforward.pools.process import _worker
    from aioforward.pools.process._messages import Stop, StreamCtl

    looked: list[int] = []
    monkeypatch.setattr(_worker, "_spin", lambda _pending: looked.append(1) and False)
    monkeypatch.setattr(_worker, "SPIN_AFTER_S", 0.05)  # a preempted short call stays short
    parent, child = multiprocessing.Pipe()
    wake = os.eventfd(0, os.EFD_CLOEXEC)
    opts = _worker.WorkerOptions(os.getpid(), "t", 1, 1, None, None, (), 65536, False, False)
    server = _worker._Server(child, opts, wake)
    server.modules.update({(1, 0): M.Tiny(), (2, 0): M.Busy(0.1), (3, 0): M.Boom()})
    thread = threading.Thread(target=server.serve, name="test-serve")
    args, _ = fr.encode_small((torch.randn(1, 10),), 65536)
    seq = 0

    def sleeping() -> None:  # until the loop sleeps on its eventfd
        assert thread.native_id is not None
        for _ in range(5000):
            if _waits_on(thread.native_id) == wake:
                return
            time.sleep(0.001)
        raise AssertionError("the worker's loop never slept on its eventfd")

    def send(data: bytes) -> None:
        tr.send_message(parent.fileno(), data)
        os.eventfd_write(wake, 1)

    def call(key: tuple[int, int]) -> int:
        nonlocal seq
        seq += 1
        send(fr.call_frame(seq, key, args))
        tr.recv_message(parent.fileno())  # the reply (a frame, or a pickled Raised)
        sleeping()
        return len(looked)

    try:
        thread.start()
        sleeping()
        call((1, 0))  # a module's first call is slow (torch warms up)
        looked.clear()
        assert call((1, 0)) == 1  # short: looked
        assert call((2, 0)) == 1  # long: slept at once
        assert call((1, 0)) == 2
        assert call((3, 0)) == 2  # raised: slept at once
        assert call((1, 0)) == 3
        send(pickle.dumps(StreamCtl(seq)))  # a word for an ended stream: no look after it
        sleeping()
        assert len(looked) == 3
        send(pickle.dumps(Stop()))
        thread.join(10)
        assert not thread.is_alive()
    finally:
        parent.close()  # the loop reads the end of the pipe once woken
        os.eventfd_write(wake, 1)
        thread.join(10)
        child.close()
        os.close(wake)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc/PID/stat")
@pytest.mark.anyio
async def test_an_idle_worker_stops_looking_for_calls_and_sleeps() -> None:
    """The look for the next call is brief: once the calls stop, the workers use no CPU."""
    m, x = M.Tiny(), torch.randn(1, 10)
    async with af.ProcessPool(workers=2) as pool:
        await pool.warmup(m, example=x)
        with anyio.fail_after(30):
            for _ in range(200):
                await pool.run_parallel(m, m, x)
            await anyio.sleep(0.05)
            before = {pid: _cpu_s(pid) for pid in pool.worker_pids()}
            await anyio.sleep(0.5)
            used = {pid: _cpu_s(pid) - t for pid, t in before.items()}
    # The parent-watch thread wakes 2 times in 0.5 s; a worker that kept spinning would use
    # the whole 0.5 s. A clock tick is 10 ms.
    assert all(t <= 0.05 for t in used.values()), used
