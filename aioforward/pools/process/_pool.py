"""ProcessPool: persistent torch worker processes, supervised one by one.

Data flow of one call::

    caller (any thread or loop)
      | submit(): encode module ref + args now: a binary frame for plain
      |           tensors (_frames), else a pickle (an unpicklable input fails
      |           here, before a worker is reserved); large tensors are recorded
      v
    PoolCore: FIFO queue / idle worker -----------------------------.
      | ProcessWorker.run(): copy the large tensors into that        |
      |   worker's warm request segment (a memfd), send the frame    |
      |   or a CallMsg on its pipe (+ descriptors of new segments)   |
      v                                                              |
    worker process (_worker.py): map segments (zero-copy views),     |
      module(*args) under inference_mode; large outputs into its     |
      own warm response segment; a reply frame or an Ok message      |
      v                                                              |
    the awaiting task's thread (a call awaited at once: an asyncio   |
      or uvloop loop's add_reader on the pipe, kept from call to     |
      call; trio's wait_readable), else the Supervisor thread        |
      (_supervisor.py), which waits on every pipe and every process  |
      sentinel: reads the reply, copies outputs out, reports         |
      call_done to the core, which completes the ForwardFuture and   |
      hands the worker its next call -------------------------------'
      | a sentinel fires (the supervisor): that worker died. Only its own call fails
      | (WorkerCrashedError naming module, pid, exit code or signal); the
      | core starts a replacement at once.

Roles: this module holds the options, the public class and the parent-side
handle of a worker; ``_supervisor`` starts and watches processes; ``_shipping``
ships modules once; ``_messages`` are the typed records on the pipe;
``_transport`` is the shared memory; ``_worker`` the worker's entry point.
Workers are started with the spawn context (fork after torch or threads have
started deadlocks), lazily, on the first ``submit``, ``warmup`` or
``wait_ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import itertools
import multiprocessing
import os
import pickle
import select
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import sniffio

from ..._cpus import usable_cpus
from ..._malloc import MALLOC_ENV
from ..._validate import check_bool, check_callable, check_int, check_number
from ...errors import SerializationError, WorkerCrashedError
from .._base import Backend, Pool
from .._worker import Worker, WorkItem
from ..thread import apply_torch_threads, claim_torch_threads, release_torch_threads
from . import _frames as fr
from . import _transport as tr
from ._messages import MAIN_GUARD_EXIT, OOM_EXIT, CallMsg, Stop, StreamCtl
from ._shipping import ModuleShipper
from ._supervisor import LOOP_COPY_MAX, Supervisor
from ._worker import WorkerOptions

if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    import torch

    from ..._call import Call
    from .._base import PoolCore

__all__ = ["ProcessPool"]

_pool_ids = itertools.count()
WORKER_ENV = "AIOFORWARD_WORKER"  # set in a worker's environment: its bootstrap can tell
NUMPY_WARNING_FILTER = "ignore:Failed to initialize NumPy"  # a -W filter: see environment()

MAIN_GUARD_HELP = (
    "the main module (or a module it imports) started a pool while a worker process was "
    "importing it. Worker "
    "processes are spawned, and each one imports your main module: create and use pools "
    'under `if __name__ == "__main__":` (or inside a function that it calls), never at the '
    "top level of a script"
)


def unspawnable_main() -> str | None:
    """Why spawned workers could not import this program's main module, or None. A worker
    imports it as multiprocessing's spawn does: by module name when it was run with ``-m``,
    else from its file; a script read from stdin has a ``__file__`` of ``<stdin>``, not a
    file (a REPL or ``python -c`` has none, and is not imported)."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return None
    path = getattr(main, "__file__", None)
    if path is None:
        return None
    full = os.path.join(getattr(multiprocessing.process, "ORIGINAL_DIR", None) or "", path)
    if os.path.isfile(full):
        return None
    return (
        f"the program's main module was read from {path!r}, not from a file, and each worker "
        "process imports the main module from its file; save the script to a file and run "
        "that (or use a ThreadPool)"
    )


class ProcessWorker(Worker):
    """The parent's handle on one worker process."""

    interruptible = True

    def __init__(self, backend: ProcessBackend, wid: int) -> None:
        super().__init__()
        self.backend = backend
        self.wid = wid
        self.proc: BaseProcess | None = None
        self.conn: Connection | None = None
        self.t_spawn = 0.0
        self.reported_ready = False
        self.stop_sent = False
        self.start_error = ""  # what it reported before dying while starting
        self.oom = ""  # the traceback it sent before exiting out of memory
        self.calls = 0
        self.modules: set[Any] = set()  # module keys it holds
        self.drops: set[Any] = set()  # module keys it must forget with its next call
        self.known: set[int] = set()  # sids of our segments it has mapped
        self.req_seg: tr.Segment | None = None  # our request segment for it
        self.out_seg: tr.Segment | None = None  # its response segment, mapped here
        # The control word: the seq of a call to stop, read by the worker's cancellation checks.
        # Created with the first call and kept as long as this handle (never unmapped under
        # a concurrent cancel()).
        self.control: tr.Segment | None = None
        self.control_word: ctypes.c_int64 | None = None
        self.send_lock = threading.Lock()  # calls, stops and stream credits share the pipe
        # The worker's eventfd (Linux): written after each message, under send_lock, which
        # also guards its closing (a write to a closed, reused descriptor would go elsewhere).
        self.wake_fd: int | None = None
        self.stream_error: BaseException | None = None  # a stream item the parent could not read
        # Who reads the replies (see run_awaited): None, the supervisor; or the token of the
        # task that awaits the running call and reads its reply in its own event loop.
        # reader, watched, watch, pending_close and trio_waits change under read_lock.
        self.read_lock = threading.RLock()
        self.reader: object | None = None
        self.watched = False  # the supervisor's current wait includes the pipe
        # When the pipe gave end of file: the worker closed it, and its exit (the sentinel)
        # follows, or the supervisor kills it after EOF_GRACE_S (it can reply no more).
        self.eof_at: float | None = None
        self.watch: _Watch | None = None  # a loop's add_reader on the pipe
        # An exited worker's pipe, closed once no loop watches it and no trio task waits on it
        self.pending_close: Connection | None = None
        # Trio tasks waiting until the pipe is readable: while one does, the pipe stays open
        # (trio must be told before it is closed) and no other task of its run waits on it
        self.trio_waits = 0
        self.unread_since: float | None = None  # the supervisor's watch on a task's reply

    def start(self) -> None:
        assert self.backend.supervisor is not None
        self.backend.supervisor.spawn(self)

    def run(self, item: WorkItem) -> None:
        with self.read_lock:
            self.reader = None
            poke = not self.watched
        if self._sent_later(item):
            return  # the supervisor waits on the pipe once it has sent
        self.backend.send_call(self, item)
        if poke:  # the supervisor must wait on the pipe for this reply
            assert self.backend.supervisor is not None
            self.backend.supervisor.poke()

    def _sent_later(self, item: WorkItem) -> bool:
        """Hand ``item`` to the supervisor's thread to send when sending it copies
        ``LOOP_COPY_MAX`` bytes or more into shared memory, so that the calling thread,
        usually an event loop's, does not copy them; return whether it did."""
        box = item.payload[3]
        supervisor = self.backend.supervisor
        assert supervisor is not None
        if box is None or box.big_bytes() < LOOP_COPY_MAX or supervisor.in_thread():
            return False
        supervisor.send_later(self, item)
        return True

    def run_awaited(self, item: WorkItem, loop: Any) -> Any:
        """Send ``item`` for a task that awaits it at once in the asyncio ``loop`` (None: a
        trio task): that task's thread reads the reply as soon as the pipe is readable
        (``_read_reply`` and ``read_watched``; ``_read_reply_trio``), so the call costs no
        supervisor wake-up and no thread-to-loop hand-off. The supervisor still sees the
        process die, and takes the read over when the task does not come to it (a loop
        blocked in sync code): see ``Supervisor._watch_tasks``."""
        if item.stream is not None:
            self.run(item)
            return None
        if loop is not None:
            reader = self._read_reply
        elif sniffio.thread_local.name == "trio":
            reader = self._read_reply_trio
        else:
            self.run(item)
            return None
        token = object()
        with self.read_lock:
            self.reader = token
        if self._sent_later(item):
            return functools.partial(reader, token)  # the task still reads it
        try:
            self.backend.send_call(self, item)
        except BaseException:
            self._release(token, ended=True)
            raise
        return functools.partial(reader, token)

    def _read_reply(
        self, token: object, fut: Any, loop: Any, box: list[Any]
    ) -> Generator[Any, None, None]:
        """Driven by the awaiting task: make the loop watch the pipe and wait until the call
        ends. The loop reads the reply as soon as the pipe is readable (``_on_readable``).
        Returns early, leaving the future to whoever ends it, when the supervisor took the
        read over or when another loop watches this pipe."""
        try:
            conn = self.conn
            if conn is None or fut.done():
                return
            with self.read_lock:
                if self.reader is not token or self.conn is not conn:
                    return
                watch = self._watch_in(loop, conn)
                if watch is None:
                    return  # the supervisor reads this reply
                watch.call = (token, box)
            try:
                while not fut.done():  # box[0] is set when the call ends
                    yield from box[0].__await__()
                    if not fut.done():
                        box[0] = loop.create_future()
            finally:
                if watch.call is not None and watch.call[0] is token:
                    watch.call = None  # the watch stays for this loop's next call
        finally:
            self._release(token, ended=False)  # unless the reply was read: nothing to do

    def _read_reply_trio(
        self, token: object, fut: Any, loop: None, box: list[Any]
    ) -> Generator[Any, None, None]:
        """``_read_reply`` for a trio task: it waits until the pipe is readable
        (``trio.lowlevel.wait_readable``) and reads the reply itself, with no supervisor
        thread and no ``run_sync_soon`` between the pipe and the task. The call ending
        elsewhere (a timeout, a cancel, the supervisor taking the read over, the worker's
        death) cancels that wait. Returns early, leaving the future to whoever ends it, as
        ``_read_reply`` does; the task then waits on the future.

        It also leaves the read to the supervisor while another task still waits on the pipe:
        one whose call the supervisor took over while their thread was blocked, and that has
        not run since (trio lets one task at a time wait until a descriptor is readable)."""
        import trio  # imported here: trio is optional

        try:
            conn = self.conn
            if conn is None or fut.done():
                return
            with self.read_lock:
                if self.reader is not token or self.conn is not conn or self.trio_waits:
                    return
                self.trio_waits += 1
            try:
                yield from self._wait_and_read_trio(token, fut, conn)
            finally:
                with self.read_lock:
                    self.trio_waits -= 1
                    if self.pending_close is conn and self.trio_waits == 0 and self.watch is None:
                        with contextlib.suppress(RuntimeError):  # closed outside the run
                            trio.lowlevel.notify_closing(conn.fileno())
                        conn.close()
                        self.pending_close = None
        finally:
            self._release(token, ended=False)  # unless the reply was read: nothing to do

    def _wait_and_read_trio(
        self, token: object, fut: Any, conn: Connection
    ) -> Generator[Any, None, None]:
        """Wait until ``conn`` is readable or the call ends elsewhere; read and act on the
        reply (``Supervisor.handle``). Returns when the call ended, was handed to the
        supervisor, or is no longer this task's to read. A message that cannot be read for
        another reason than the worker's death fails the call, which the caller sees."""
        import trio  # imported here: trio is optional

        fd = conn.fileno()
        scope = trio.CancelScope()
        ending = [False]  # this task ends the call: no need to wake it
        trio_token = trio.lowlevel.current_trio_token()

        def on_done(_f: object) -> None:  # any thread
            if not ending[0]:
                with contextlib.suppress(trio.RunFinishedError):
                    trio_token.run_sync_soon(scope.cancel)

        fut.add_done_callback(on_done)
        with scope:
            while not fut.done():
                # awaited: driven by the task's await of the future
                yield from trio.lowlevel.wait_readable(fd).__await__()  # noqa: ASYNC105
                with self.read_lock:
                    if self.reader is not token or self.conn is not conn:
                        return  # the supervisor took the read over, or the worker is gone
                    if not tr.readable(fd):
                        continue  # the supervisor read what woke us before it let go
                    ending[0] = True
                    try:
                        data = tr.recv_message(fd)
                        assert self.backend.supervisor is not None
                        if self.backend.supervisor.handle(self, data, in_loop=True):
                            self.reader = None  # ended, or handed to the supervisor to end
                            return
                    except (EOFError, OSError):
                        return  # the worker died: the supervisor reports it
                    finally:
                        ending[0] = False

    def read_watched(self, watch: _Watch) -> None:
        """The loop sees the pipe readable while a task awaits its call: read the message
        and act on it here, in the loop's thread."""
        assert watch.call is not None
        token = watch.call[0]
        with self.read_lock:
            if self.reader is not token or self.conn is not watch.conn:
                # The supervisor took the read over, or the worker is gone: stop watching
                # (the loop would see the pipe readable on every turn until it is read).
                self.unwatch(watch)
                return
            if not watch.poller.poll(0):
                return  # the supervisor read what the loop saw before it let go
            try:
                data = tr.recv_message(watch.fd)
                assert self.backend.supervisor is not None
                ended = self.backend.supervisor.handle(self, data, in_loop=True)
            except BaseException as exc:
                # The worker died (the supervisor reports it), or reading failed: hand the
                # read to the supervisor rather than see the pipe readable on every turn.
                self.unwatch(watch)
                self._release(token, ended=False)
                if isinstance(exc, EOFError | OSError):
                    return
                raise
            if ended:
                self.reader = None  # the call ended (its task was woken): nothing to hand on

    def _watch_in(self, loop: Any, conn: Connection) -> _Watch | None:
        """The watch of ``loop`` on this worker's pipe, made on its first call (called under
        ``read_lock``). None while another open loop watches it."""
        old = self.watch
        if old is not None:
            if old.loop is loop and old.conn is conn:
                return old
            if not old.loop.is_closed():
                return None  # that loop ends its watch when it next sees the pipe readable
            self.backend.watches.discard(old)
        watch = _Watch(self, loop, conn)
        loop.add_reader(watch.fd, _on_readable, watch)
        if not os.get_blocking(watch.fd):  # uvloop (libuv) makes a polled descriptor
            os.set_blocking(watch.fd, True)  # non-blocking; the pipe's reads need it blocking
        self.watch = watch
        self.backend.watches.add(watch)
        return watch

    def unwatch(self, watch: _Watch) -> None:
        """End ``watch`` (in its loop's thread); close the pipe if the worker exited."""
        if not watch.loop.is_closed():
            watch.loop.remove_reader(watch.fd)
        self.backend.watches.discard(watch)
        with self.read_lock:
            if self.watch is watch:
                self.watch = None
            if self.pending_close is not None and self.watch is None and not self.trio_waits:
                self.pending_close.close()
                self.pending_close = None

    def _release(self, token: object, ended: bool) -> None:
        """The task stops reading; the supervisor reads from now on (and is told to wait on
        the pipe when the reply is still to come)."""
        if self.reader is not token:
            return  # only run_awaited sets it to this token, before the task reads
        with self.read_lock:
            poke = False
            if self.reader is token:
                self.reader = None
                poke = not ended and not self.watched
        if poke:
            assert self.backend.supervisor is not None
            self.backend.supervisor.poke()

    def cancel(self, item: WorkItem) -> None:
        word = self.control_word
        if self.item is item and word is not None:
            word.value = item.seq  # the worker's next block boundary raises
        if item.stream is not None:
            self.send_ctl(StreamCtl(item.seq, cancel=True))  # wakes it if it waits for credit

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        """Send a message (and descriptors after it) on the worker's pipe and wake it: the
        one way messages reach a worker (calls, stream words, the stop), any thread."""
        with self.send_lock:
            conn = self.conn
            if conn is None:
                return  # the worker died and was reaped: worker_lost failed its call
            try:
                tr.send_message(conn.fileno(), data)
                if fds:
                    tr.send_fds(conn, fds)
                self.wake()
            except OSError:
                pass  # the worker is dying: its sentinel reports it

    def send_ctl(self, msg: StreamCtl) -> None:
        """A word about a running stream (credits, a freed segment, a cancel), any thread."""
        self.send(pickle.dumps(msg))

    def interrupt(self, item: WorkItem) -> bool:
        proc = self.proc
        if self.item is item and proc is not None:
            try:
                proc.kill()  # the supervisor reaps it; the core replaces it
            except (OSError, ValueError):
                return False
            return True
        return False

    def stop(self) -> None:
        assert self.backend.supervisor is not None
        self.backend.supervisor.stop(self)

    def send_stop(self) -> None:
        """Called by the supervisor, under its lock, once the process exists."""
        if self.conn is not None and not self.stop_sent:
            self.stop_sent = True
            self.send(pickle.dumps(Stop()))  # if it is already gone, its sentinel says so

    def wake(self) -> None:
        """Wake the worker for the message just written (under ``send_lock``): see
        ``_Server.serve`` in ``_worker``."""
        fd = self.wake_fd
        if fd is not None:
            os.eventfd_write(fd, 1)

    def set_wake_fd(self, fd: int | None) -> None:
        """Take the worker's eventfd (None: forget it, closing ours), and wake it once for
        any message written before we had it."""
        with self.send_lock:
            old, self.wake_fd = self.wake_fd, fd
            if old is not None:
                os.close(old)
            self.wake()

    def crash_error(self, item: WorkItem, code: int | None) -> WorkerCrashedError:
        if self.oom or code == OOM_EXIT:
            how = "ran out of memory"
            hint = f" (hint: the worker ran out of memory)\n{self.oom}"
        elif code is not None and code < 0:
            sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by signal {sig}"
            hint = " (SIGKILL: the kernel's OOM killer or a timeout)" if sig == "SIGKILL" else ""
            if sig == "SIGKILL" and self.eof_at is not None:
                hint = " (it had closed its pipe and did not exit: the supervisor killed it)"
        else:
            how, hint = f"exited with code {code}", ""
        return WorkerCrashedError(
            f"worker pid {self.pid} running {item.name} {how}{hint}",
            module=item.name,
            pid=self.pid or 0,
            exitcode=code,
        )


class _Watch:
    """An asyncio loop's ``add_reader`` on a worker's pipe, kept from call to call while that
    loop's tasks await the worker's calls. ``call`` is the call a task awaits: the loop
    reads its reply in the callback that sees the pipe readable, so that no later turn sees
    it readable again, and ending the call wakes the task. Between calls it is None, and a
    readable pipe then carries a reply that is not this loop's (the supervisor reads it):
    the watch ends, since the loop would otherwise see the pipe readable on every turn.
    The callback checks that the pipe is still readable before it reads: the loop may have
    seen a reply that the supervisor read meanwhile."""

    __slots__ = ("worker", "loop", "conn", "fd", "call", "poller")

    def __init__(self, worker: ProcessWorker, loop: Any, conn: Connection) -> None:
        self.worker = worker
        self.loop = loop
        self.conn = conn
        self.fd = conn.fileno()
        self.poller = select.poll()  # is the pipe still readable? (tr.readable, kept)
        self.poller.register(self.fd, select.POLLIN)
        self.call: tuple[object, list[Any]] | None = None  # (reader token, task's wake-up)


def _on_readable(watch: _Watch) -> None:
    """The pipe is readable: read the reply of the call a task awaits, or end the watch."""
    if watch.call is None:
        watch.worker.unwatch(watch)
    else:
        watch.worker.read_watched(watch)


class _Credits:
    """Give a streaming worker its places back as the consumer takes items, half a buffer at
    a time: one message per ``buffer // 2`` items instead of one per item. It never stalls:
    once the consumer has taken all it was sent, at least ``buffer`` places were returned."""

    def __init__(self, w: ProcessWorker, seq: int, buffer: int) -> None:
        self._w, self._seq = w, seq
        self._every = max(1, buffer // 2)
        self._taken = 0

    def take(self) -> None:  # the consumer's thread, one at a time
        self._taken += 1
        if self._taken >= self._every:
            credit, self._taken = self._taken, 0
            self._w.send_ctl(StreamCtl(self._seq, credit=credit))


class ProcessBackend(Backend):
    """Options and shared state of one ProcessPool (no reference to the pool)."""

    dispatch_in_submit = True

    def __init__(
        self,
        name: str,
        *,
        threads_per_worker: int,
        interop_threads: int,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        seed: int | None,
        kill_on_cancel: bool,
        max_calls_per_worker: int | None,
        parent_threads: int | None,
        inline_bytes: int,
        shm_limit: int | None,
        start_timeout: float,
        cancel_checks: bool,
        cancel_grace: float,
    ) -> None:
        self.name = name
        self.cancel_checks = cancel_checks
        self.cancel_grace = cancel_grace
        self.threads_per_worker = threads_per_worker
        self.interop_threads = interop_threads
        self.initializer = initializer
        self.initargs = initargs
        self.seed = seed
        self.interrupt_on_cancel = True  # a cancelled call that overran its grace is killed
        self.kill_on_cancel = kill_on_cancel
        self.max_calls_per_worker = max_calls_per_worker
        self.parent_threads = parent_threads
        self.inline_bytes = inline_bytes
        self.shm_limit = shm_limit
        self.start_timeout = start_timeout
        self.memfd = tr.MEMFD
        self.prefix = f"{tr.PREFIX}{os.getpid()}_{next(_pool_ids)}_"
        self.ctx = multiprocessing.get_context("spawn")
        self.shipper = ModuleShipper(self.prefix, shm_limit, self.memfd)
        self.supervisor: Supervisor | None = None
        self._wids = itertools.count()
        self._released = False
        self._restore: int | None = None  # parent_threads: the count to restore at close
        self._room_checked = 0  # the largest request size check_room has passed
        self.watches: set[_Watch] = set()  # event loops' watches on the workers' pipes

    # ------------------------------------------------------------------ Backend
    def new_worker(self, core: PoolCore) -> Worker:
        return ProcessWorker(self, next(self._wids))

    def open(self, core: PoolCore) -> None:
        if getattr(multiprocessing.current_process(), "_inheriting", False):
            # We run inside a spawned process that is still importing the parent's main
            # module: the script has no main guard. Starting workers here would fail with
            # multiprocessing's bootstrapping error, or spawn without end.
            if os.environ.get(WORKER_ENV):
                os._exit(MAIN_GUARD_EXIT)  # the parent names the cause
            raise RuntimeError(f"cannot start {self.name}: {MAIN_GUARD_HELP}")
        if not self.memfd:
            tr.sweep_stale()
        self.shipper.watch(lambda: [w for w in core.live_workers() if isinstance(w, ProcessWorker)])
        self.supervisor = Supervisor(self, core)

    def claim(self) -> None:
        """``parent_threads``: set this process's torch threads from the pool's construction
        (in the constructing thread, as ThreadPool does) until it closes."""
        if self.parent_threads is not None:
            claim_torch_threads(self, self.parent_threads)

    def environment(self) -> dict[str, str]:
        """Variables a worker needs before torch loads (spawn copies ``os.environ``)."""
        return {
            **MALLOC_ENV,  # glibc reads these at start: see aioforward._malloc
            "OMP_NUM_THREADS": str(self.threads_per_worker),
            "MKL_NUM_THREADS": str(self.threads_per_worker),
            WORKER_ENV: "1",
            # torch without numpy warns "Failed to initialize NumPy" at import (aioforward
            # does not use numpy); the program has shown it once, not again per worker.
            "PYTHONWARNINGS": ",".join(
                filter(None, (os.environ.get("PYTHONWARNINGS"), NUMPY_WARNING_FILTER))
            ),
        }

    def worker_options(self, w: ProcessWorker) -> WorkerOptions:
        return WorkerOptions(
            parent_pid=os.getpid(),
            name=f"{self.prefix}w{w.wid}",
            threads=self.threads_per_worker,
            interop_threads=self.interop_threads,
            seed=self.seed,
            initializer=self.initializer,
            initargs=self.initargs,
            inline_bytes=self.inline_bytes,
            memfd=self.memfd,
            cancel_checks=self.cancel_checks,
        )

    def prepare(self, c: Call) -> Any:
        key, ref = self.shipper.reference(c.module)
        box: tr.Outbox | None
        if ref[0] == "m":
            # The common call: its tensors in a binary frame, no pickle (see _frames).
            framed = fr.encode_small(c.args, self.inline_bytes, c.kwargs)
            if framed is not None:
                args, box = framed
                if box is not None:
                    self._check_room(box.big_bytes())
                return (key, ref, args, box, True)
        box = tr.Outbox(self.inline_bytes)
        # A shipped module's reference is a few ints and a name: it travels in the CallMsg,
        # outside the body, whose pickler calls back into Python for every object it holds.
        head = ref if ref[0] in ("m", "meth") else None
        try:
            body = box.dumps((c.args, c.kwargs) if head is not None else (ref, c.args, c.kwargs))
        except Exception as exc:
            what = "the arguments of"
            if ref[0] == "fn":
                try:
                    pickle.dumps(ref[1], protocol=5)
                except Exception:
                    what = "the function"
            hint = (
                "; define it at the top level of a module (a lambda or a nested function "
                "cannot be pickled)"
                if what == "the function"
                else ""
            )
            raise SerializationError(
                f"{what} {c.name} cannot be sent to a worker process: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc
        self._check_room(box.big_bytes())
        return (key, head, body, box, False)

    def _check_room(self, need: int) -> None:
        """Fail here, in submit, when the tensors cannot be placed. Only for a size not seen
        before: segments are reused, and the check reads /proc/meminfo, which cost more than
        the rest of a call. (A segment that cannot be made later still fails its call with
        the same error: see Segment.create.)"""
        if need > self._room_checked:
            tr.check_room(need, self.shm_limit, self.memfd)
            self._room_checked = need

    def unshipped(self, fn: Any) -> bool:
        return self.shipper.unshipped(fn)

    def send_call(self, w: ProcessWorker, item: WorkItem) -> None:
        """Copy ``item``'s inputs into ``w``'s request segment and send it (one call at a time
        per worker, so no lock: the core reserved ``w`` for ``item``)."""
        key, head, body, box, binary = item.payload
        t0 = time.perf_counter()
        new: list[tr.Segment] = []
        table: list[tuple[int, str, tuple[int, ...]]] = []
        request = None
        if box is not None and box.big:
            old = w.req_seg
            w.req_seg = tr.ensure_segment(
                old, f"{self.prefix}w{w.wid}_in", box.big_bytes(), self.memfd
            )
            if w.req_seg is not old:
                new.append(w.req_seg)
            table = box.write(w.req_seg)
            request = w.req_seg.sid
        if (
            binary
            and not new
            and item.stream is None
            and key in w.modules
            and not w.drops
            and w.control is not None
        ):
            # The per-call path: a frame to a worker that holds the module and has mapped
            # the request segment (a concurrent release adds to w.drops; it is sent with
            # the next call, as below).
            w.send(fr.call_frame(item.seq, key, body))
            item.transfer_s = time.perf_counter() - t0
            item.release_inputs()
            return
        load, weights, drops = self.shipper.for_worker(w, key, item.name)
        if weights is not None and weights.sid not in w.known:
            new.append(weights)
        control = None
        if w.control is None:
            w.control = tr.Segment.create(f"{self.prefix}w{w.wid}_ctl", 64, memfd=self.memfd)
            w.control_word = ctypes.c_int64.from_address(w.control.buf.data_ptr())
            w.control_word.value = -1
            new.append(w.control)
            control = w.control.sid
        stream = 0
        if item.stream is not None:
            stream = item.stream.buffer
            item.stream.on_take = _Credits(w, item.seq, stream).take
        # (a call that could go as a frame alone took the path above)
        msg = CallMsg(
            tuple(s.ref for s in new),
            request,
            table,
            drops,
            load,
            body,
            item.seq,
            stream,
            control,
            head,
            binary,
        )
        data = pickle.dumps(msg, protocol=5)
        item.release_inputs()  # the inputs are copied: drop our references to them
        item.transfer_s = time.perf_counter() - t0
        w.send(data, [s.fd for s in new if s.fd is not None] if self.memfd else [])
        for s in new:
            w.known.add(s.sid)
        if w.req_seg is not None and w.req_seg in new:
            w.req_seg.close_fd()  # the worker has its own descriptor now
        if control is not None:
            w.control.close_fd()

    def reload(self, module: torch.nn.Module) -> None:
        self.shipper.reload(module)

    def close(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()  # it releases the rest once its thread ends
        else:
            self.release()

    def join(self, timeout: float | None) -> None:
        if self.supervisor is not None:
            self.supervisor.join(timeout)

    def release(self) -> None:
        """Everything the pool held, after the last worker exited (idempotent)."""
        if self._released:
            return
        self._released = True
        self.shipper.close()
        if not self.memfd:
            tr.unlink_prefix(self.prefix)
        self._restore = release_torch_threads(self)

    def release_caller(self) -> None:
        apply_torch_threads(self._restore)
        self._restore = None
        # A loop ends its watch on an exited worker's pipe (and closes the pipe) when it next
        # runs; a pool closed by sync code in a coroutine blocked that loop: end them here.
        # So can one of a loop that no longer runs (run_until_complete, then close in sync
        # code). Not running_asyncio_loop(): this may run outside any async context.
        loop = asyncio._get_running_loop()
        for watch in list(self.watches):
            if watch.loop is loop or not watch.loop.is_running():
                watch.worker.unwatch(watch)


class ProcessPool(Pool):
    """Run forward passes in persistent, supervised torch worker processes.

    Use it when modules spend time in Python code that holds the GIL, to isolate
    faults, or to kill hung calls. Each worker runs one call at a time::

        async with aioforward.ProcessPool(workers=2, initializer=setup, initargs=(cfg,)) as pool:
            await pool.warmup(m1, m2, example=x)
            y1, y2 = await pool.run_parallel(m1, m2, x)

    It is a ``concurrent.futures.Executor`` too (``submit``, ``map``,
    ``shutdown``), so sync code and ``loop.run_in_executor`` can use it with
    picklable, importable functions. Constructing it starts nothing: workers
    start on the first ``submit``, ``warmup`` or ``wait_ready``, so a pool may
    be created at the top of a module that workers import. Code that *uses* a
    pool in a script must run under ``if __name__ == "__main__":``.

    Arguments (each a trade-off):
        workers: processes, i.e. calls in flight (default: usable CPUs). More
            workers than cores only adds memory and contention.
        threads_per_worker: torch intra-op threads in each worker (default:
            usable CPUs // workers, at least 1): workers x threads <= cores
            avoids oversubscription, which made two calls slower than one here.
        interop_threads: torch inter-op threads per worker (default 1).
        initializer, initargs: called in each worker after torch is set up.
        seed: ``torch.manual_seed(seed)`` in every worker (default: not set).
        kill_on_cancel: kill and replace the worker of a cancelled call at once,
            without waiting for a block boundary (costs a worker start).
        cancel_checks: make the stacks of the modules in the workers
            (``nn.ModuleList``/``nn.Sequential``) check for cancellation before
            each member, so that a cancelled or timed-out call stops at its next
            block and the worker, its weights and warm memory survive (default
            True).
        cancel_grace: seconds a cancelled or timed-out call has to stop at a
            block boundary; after it the worker is killed and replaced
            (default 1.0).
        max_calls_per_worker: recycle a worker after this many calls (bounds
            leaks in user code; each recycle costs a worker start).
        max_queued: waiting calls allowed before ``QueueFullError``.
        parent_threads: set the parent's torch intra-op threads while the pool
            is open (e.g. 1): a parent that keeps torch's default threads spins
            OpenMP threads after each op and took the two-module speed-up from
            1.9x to 1.3x here. Default: leave the parent alone.
        inline_bytes: tensors up to this size travel through the pipe, larger
            ones through shared memory (default 64 KiB). Large results are copied
            out by the supervisor thread: call :func:`aioforward.keep_freed_memory`
            so those copies reuse warm memory instead of fresh pages.
        shm_limit: most bytes of shared memory one transfer may use
            (default: what the system has available).
        start_timeout: seconds a worker may take to start before it is
            treated as failed (default 60).
        name: the prefix of the worker processes' and threads' names.
    """

    _kind = "process"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        interop_threads: int = 1,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        seed: int | None = None,
        kill_on_cancel: bool = False,
        cancel_checks: bool = True,
        cancel_grace: float = 1.0,
        max_calls_per_worker: int | None = None,
        max_queued: int | None = None,
        parent_threads: int | None = None,
        inline_bytes: int = tr.INLINE_BYTES,
        shm_limit: int | None = None,
        start_timeout: float = 60.0,
        name: str | None = None,
    ) -> None:
        cpus = usable_cpus()
        workers = cpus if workers is None else workers
        check_int("workers", workers, 1)
        check_int("threads_per_worker", threads_per_worker, 1, optional=True)
        problem = unspawnable_main()
        if problem is not None:
            raise RuntimeError(f"a ProcessPool cannot start workers here: {problem}")
        threads_per_worker = threads_per_worker or max(1, cpus // workers)
        check_int("interop_threads", interop_threads, 1)
        check_callable("initializer", initializer)
        if not isinstance(initargs, tuple | list):
            raise TypeError(
                f"initargs must be a tuple of arguments for the initializer, got {initargs!r} "
                f"({type(initargs).__name__}); write initargs=({initargs!r},) for one argument"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
        check_bool("kill_on_cancel", kill_on_cancel)
        check_bool("cancel_checks", cancel_checks)
        check_number("cancel_grace", cancel_grace)
        check_int("max_calls_per_worker", max_calls_per_worker, 1, optional=True)
        check_int("parent_threads", parent_threads, 1, optional=True)
        check_int("inline_bytes", inline_bytes, 0)
        check_int("shm_limit", shm_limit, 0, optional=True)
        check_number("start_timeout", start_timeout, positive=True)
        self.threads_per_worker = threads_per_worker
        self.interop_threads = interop_threads
        self.kill_on_cancel = kill_on_cancel
        self.cancel_checks = cancel_checks
        self.cancel_grace = float(cancel_grace)
        self.max_calls_per_worker = max_calls_per_worker
        self.parent_threads = parent_threads
        self.inline_bytes = inline_bytes
        self.shm_limit = shm_limit
        self.start_timeout = start_timeout
        name = name or f"aioforward-{self._kind}"
        backend = ProcessBackend(
            name,
            threads_per_worker=threads_per_worker,
            interop_threads=interop_threads,
            initializer=initializer,
            initargs=tuple(initargs),
            seed=seed,
            kill_on_cancel=kill_on_cancel,
            max_calls_per_worker=max_calls_per_worker,
            parent_threads=parent_threads,
            inline_bytes=inline_bytes,
            shm_limit=shm_limit,
            start_timeout=float(start_timeout),
            cancel_checks=cancel_checks,
            cancel_grace=float(cancel_grace),
        )
        super().__init__(backend, workers=workers, max_queued=max_queued, name=name)
        backend.claim()
