"""The supervisor: one thread per process pool that starts worker processes, reads their
replies and reaps them when they exit.

It waits with :func:`multiprocessing.connection.wait` on a wake-up pipe, every
worker's pipe and every worker's process sentinel. It only reports to the core
(``worker_ready``, ``call_done``, ``worker_lost``); the core decides what
happens next (the next call, a replacement). It watches the processes it
started, which is its role; the core alone counts workers and capacity.

Every handle of a dead worker (its pipe, its process object with the sentinel
descriptor, its shared-memory mappings) is closed when it is reaped.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import pickle
import signal
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

from ...errors import RemoteTraceback, SerializationError, WorkerStartError
from . import _frames as fr
from . import _transport as tr
from ._messages import (
    MAIN_GUARD_EXIT,
    Item,
    Ok,
    OutOfMemory,
    Raised,
    Ready,
    StartFailed,
    StreamCtl,
    Unsendable,
)
from ._worker import worker_main

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .._base import PoolCore
    from .._worker import WorkItem
    from ._pool import ProcessBackend, ProcessWorker

__all__ = ["Supervisor"]

_environ_lock = threading.Lock()  # spawn copies os.environ: one start at a time sets it


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while a worker is spawned. The child inherits the mask, so
    a Ctrl-C that reaches the whole process group (a terminal, a supervisor) while it starts
    stays pending until ``worker_main`` ignores SIGINT, which discards it: the worker never
    raises KeyboardInterrupt, even while it imports the main module. This process loses
    nothing: a process-directed signal goes to a thread that does not block it."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    # A spawn starts multiprocessing's resource tracker first if it is not running, and
    # unblocks SIGINT in this thread after starting it (resource_tracker.ensure_running):
    # the first worker of a program would import the main module (torch: a second or more)
    # with SIGINT unblocked. Started now, the tracker is found running inside the spawn.
    multiprocessing.resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# How long a reply may wait unread by the task that owns it before this thread reads it; also
# how often it looks while a task owns a pipe.
WATCH_INTERVAL = 0.1
# Tensors of this many bytes or more in shared memory are copied by this thread, never by an
# event loop's thread: a call awaited on asyncio reads its reply in the loop (see
# ProcessWorker.run_awaited), and copying a 64 MiB result there froze the loop for 40 ms.
# Below it the calling thread copies: about 1 ms at most here, where handing the copy to this
# thread costs a wake-up (0.2 ms) that a mid-size call would pay each way.
LOOP_COPY_MAX = 4 << 20
# A worker that closed its pipe (its reply can no longer come) and has not exited this long
# after, while not told to stop, is killed: its call fails rather than wait on it for ever.
# A worker that was told to stop is left to exit on its own (its atexit handlers run).
EOF_GRACE_S = 5.0


class Supervisor:
    """Starts, watches and reaps the worker processes of one pool."""

    def __init__(self, backend: ProcessBackend, core: PoolCore) -> None:
        self._backend = backend
        self._core = core
        self._lock = threading.Lock()
        self._to_spawn: list[ProcessWorker] = []
        # (worker, fn): run by this thread (see call_soon)
        self._soon: list[tuple[ProcessWorker, Callable[[], None]]] = []
        self._procs: dict[int, ProcessWorker] = {}  # started processes, by worker id
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(
            target=self._main, name=f"{backend.name}-supervisor", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ requests (any thread)
    def spawn(self, w: ProcessWorker) -> None:
        with self._lock:
            self._to_spawn.append(w)
        self.poke()

    def stop(self, w: ProcessWorker) -> None:
        with self._lock:
            w.send_stop()  # no process yet: _start sees w.stopping and never starts it
        self.poke()

    def close(self) -> None:
        with self._lock:
            self._closing = True
        self.poke()

    def join(self, timeout: float | None) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def call_soon(self, w: ProcessWorker, fn: Callable[[], None]) -> None:
        """Run ``fn``, work for ``w``, in this thread before it next waits, and before it
        reaps ``w`` (``fn`` handles its own errors)."""
        with self._lock:
            self._soon.append((w, fn))
        self.poke()

    def _run_soon(self, only: ProcessWorker | None = None) -> None:
        """Run what ``call_soon`` queued (for ``only``, when given)."""
        with self._lock:
            run = [fn for w, fn in self._soon if only is None or w is only]
            self._soon = [(w, fn) for w, fn in self._soon if only is not None and w is not only]
        for fn in run:
            fn()

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def send_later(self, w: ProcessWorker, item: WorkItem) -> None:
        """Copy ``item``'s inputs and send it to ``w`` from this thread (large inputs: see
        ``LOOP_COPY_MAX``); the call fails as ``PoolCore._run`` would fail it."""

        def send() -> None:
            if w.item is not item:  # the worker died meanwhile (this thread reaped it and
                return  # failed the call); a cancelled call is sent, as it would have been
            try:
                self._backend.send_call(w, item)
            except Exception as exc:
                self._core.call_done(w, item, exc=exc)

        self.call_soon(w, send)

    def poke(self) -> None:
        """Wake the thread: it recomputes what it waits on."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ the thread
    def _main(self) -> None:
        try:
            self._loop()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._backend.release()

    def _loop(self) -> None:
        timeout_s = self._backend.start_timeout
        while True:
            with self._lock:
                spawns, self._to_spawn = self._to_spawn, []
                closing = self._closing
            for w in spawns:
                self._start(w)
            self._run_soon()
            with self._lock:
                procs = list(self._procs.values())
                if closing and not procs and not self._to_spawn and not self._soon:
                    return
            waitables: list[Any] = [self._wake_r]
            by_conn: dict[Any, ProcessWorker] = {}
            by_sentinel: dict[int, ProcessWorker] = {}
            now = time.monotonic()
            timeout: float | None = None
            for w in procs:
                assert w.conn is not None and w.proc is not None
                with w.read_lock:  # a task reading its own call's reply has the pipe
                    # A pipe at end of file stays readable: waiting on it would spin this
                    # thread (a core, taken from the workers) until the exit is seen.
                    w.watched = w.reader is None and w.eof_at is None
                if w.watched:
                    waitables.append(w.conn)
                    by_conn[w.conn] = w
                elif w.eof_at is None:
                    timeout = WATCH_INTERVAL if timeout is None else min(timeout, WATCH_INTERVAL)
                waitables.append(w.proc.sentinel)
                by_sentinel[w.proc.sentinel] = w
                if not w.reported_ready:
                    left = max(0.0, w.t_spawn + timeout_s - now)
                    timeout = left if timeout is None else min(timeout, left)
                if w.eof_at is not None and not w.stopping:
                    left = max(0.0, w.eof_at + EOF_GRACE_S - now)
                    timeout = left if timeout is None else min(timeout, left)
            ready = multiprocessing.connection.wait(waitables, timeout)
            dead: list[ProcessWorker] = []
            for obj in ready:
                if obj is self._wake_r or obj == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 4096)
                elif obj in by_conn:
                    self._on_message(by_conn[obj])
                elif obj in by_sentinel:
                    dead.append(by_sentinel[obj])
            for w in dead:
                self._on_exit(w)
            now = time.monotonic()
            self._watch_tasks([w for w in procs if w not in dead], now)
            for w in procs:
                if w in dead:
                    continue
                # A worker told to stop before it was ready is killed: it runs no call, and
                # it would read the stop only once its initializer returned (close() waited
                # for that, up to start_timeout for one that hangs).
                late = not w.stopping and now - w.t_spawn > timeout_s
                if not w.reported_ready and late:
                    w.start_error = f"worker did not start within {timeout_s} s"
                hung = w.eof_at is not None and not w.stopping and now - w.eof_at >= EOF_GRACE_S
                if (not w.reported_ready and (w.stopping or late)) or hung:
                    assert w.proc is not None
                    with contextlib.suppress(OSError, ValueError):
                        w.proc.kill()

    def _watch_tasks(self, procs: list[ProcessWorker], now: float) -> None:
        """Take over reading a reply that a task has left unread for ``WATCH_INTERVAL``: its
        loop is blocked (sync code waiting for a call queued behind this one) or gone."""
        for w in procs:
            conn = w.conn
            if w.reader is None or conn is None:
                w.unread_since = None
                continue
            try:
                readable = tr.readable(conn.fileno())
            except (OSError, ValueError):
                continue
            if not readable:
                w.unread_since = None
            elif w.unread_since is None:
                w.unread_since = now
            elif now - w.unread_since >= WATCH_INTERVAL:
                w.unread_since = None
                with w.read_lock:
                    w.reader = None  # the task finds it taken over and waits on its future
                self.poke()

    def _start(self, w: ProcessWorker) -> None:
        if w.stopping:
            self._core.worker_lost(w)
            return
        backend = self._backend
        parent_conn, child_conn = backend.ctx.Pipe(duplex=True)
        proc = backend.ctx.Process(
            target=worker_main,
            args=(child_conn, backend.worker_options(w)),
            name=f"{backend.name}-worker-{w.wid}",
            daemon=True,
        )
        try:
            with _environ_lock, _sigint_blocked():
                env = backend.environment()
                saved = {k: os.environ.get(k) for k in env}
                os.environ.update(env)
                try:
                    proc.start()
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
        except BaseException as exc:
            parent_conn.close()
            child_conn.close()
            err = WorkerStartError(
                f"a worker of {backend.name} could not be started: {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._core.worker_lost(w, start_error=err)
            return
        child_conn.close()
        with self._lock:
            w.proc, w.conn, w.pid = proc, parent_conn, proc.pid
            w.t_spawn = time.monotonic()
            self._procs[w.wid] = w
            if w.stopping:
                w.send_stop()

    def _on_message(self, w: ProcessWorker) -> None:
        with w.read_lock:
            conn = w.conn
            if w.reader is not None or conn is None:
                return  # a task reads this reply itself
            try:
                # A task that owned the pipe may have read what woke us before it let go.
                if not tr.readable(conn.fileno()):
                    return
                data = tr.recv_message(conn.fileno())
            except (EOFError, OSError):
                w.eof_at = time.monotonic()  # not waited on again: the sentinel reports the
                return  # exit (or EOF_GRACE_S passes: see _loop)
            self.handle(w, data)

    def handle(self, w: ProcessWorker, data: bytes, in_loop: bool = False) -> bool:
        """Act on one message from ``w`` (read by this thread, or under ``w.read_lock`` by the
        event loop of the task that awaits the call: ``in_loop``); return whether it ended the
        call, or handed its end to this thread."""
        if data[0] == fr.REPLY:  # a tensor result, in a frame of its own
            if in_loop and fr.reply_shared_bytes(data) >= LOOP_COPY_MAX:
                self.call_soon(w, lambda: self._on_reply_locked(w, data))  # copied here
            else:
                self._on_reply(w, data)
            return True
        msg = pickle.loads(data)
        if isinstance(msg, Ready):
            if msg.wake:
                assert w.conn is not None
                w.set_wake_fd(tr.recv_fds(w.conn, 1)[0])
            w.reported_ready = True
            self._core.worker_ready(w)
        elif isinstance(msg, StartFailed):
            w.start_error = msg.traceback  # the process exits; _on_exit reports it
        elif isinstance(msg, OutOfMemory):
            w.oom = msg.traceback  # the process exits with OOM_EXIT; _on_exit fails the call
        elif isinstance(msg, Item):
            self._on_item(w, msg)
        elif in_loop and isinstance(msg, Ok) and tr.table_bytes(msg.table) >= LOOP_COPY_MAX:
            # Copy the result out here, not in the loop. Its segments' descriptors follow it
            # on the pipe: take them now, so that the pipe holds nothing more for the loop.
            self._receive_segments(w, msg)
            ok = msg._replace(new=())
            self.call_soon(w, lambda: self._on_reply_locked(w, ok))
            return True
        else:
            self._on_reply(w, msg)
            return True
        return False

    def _on_reply_locked(self, w: ProcessWorker, msg: Ok | bytes) -> None:
        with w.read_lock:
            self._on_reply(w, msg)

    def _on_reply(self, w: ProcessWorker, msg: Any) -> None:
        item = w.item
        if item is None:  # cannot happen: each call is sent to a worker reserved for it
            warnings.warn(
                f"{self._backend.name}: a reply from worker pid {w.pid} that runs no call "
                f"was dropped: {type(msg).__name__}",
                RuntimeWarning,
                stacklevel=1,
            )
            return
        t_recv = time.perf_counter()
        result: Any = None
        exc: BaseException | None = None
        compute_s = 0.0
        if isinstance(msg, bytes):  # a reply frame
            try:
                compute_s, result = fr.read_reply(msg, w.out_seg)
            except Exception as e:  # cannot happen; fail the call rather than hang it
                exc = SerializationError(f"the result of {item.name} could not be read: {e}")
        elif isinstance(msg, Ok):
            compute_s = msg.compute_s
            result, exc = self._read(w, msg, f"the result of {item.name}")
        elif isinstance(msg, Raised):
            exc = msg.error.rebuild()
        elif isinstance(msg, Unsendable):
            exc = SerializationError(
                f"the result of {item.name} could not be pickled in worker pid {w.pid}: {msg.text}"
            )
            exc.__cause__ = RemoteTraceback(msg.traceback)
        else:
            exc = RuntimeError(f"unexpected message from worker pid {w.pid}: {msg!r}")
        w.calls += 1
        item.compute_s = compute_s
        if w.stream_error is not None:
            exc, w.stream_error, result = w.stream_error, None, None
        item.transfer_s += time.perf_counter() - t_recv  # send-side copy + receive-side unpickle
        limit = self._backend.max_calls_per_worker
        retire = limit is not None and w.calls >= limit
        self._core.call_done(w, item, result, exc, retire=retire)

    def _on_item(self, w: ProcessWorker, msg: Item) -> None:
        """One item of a streaming call: copy it out, hand it to the consumer's channel."""
        item = w.item
        if item is None or item.stream is None:
            return  # cannot happen: items come only from a streaming call
        value, exc = self._read(w, msg, f"an item streamed by {item.name}")
        if exc is not None:
            w.stream_error = exc  # the call ends with it
            item.request_cancel()
            w.cancel(item)
            return
        if msg.table:
            w.send_ctl(StreamCtl(item.seq, freed=True))  # it may write the next one
        item.stream.feed(value)

    def _read(
        self, w: ProcessWorker, msg: Ok | Item, what: str
    ) -> tuple[Any, BaseException | None]:
        """The value a result or stream item carries (copied out of shared memory), or the
        ``SerializationError`` saying why it could not be read."""
        try:
            self._receive_segments(w, msg)
            return tr.loads(msg.payload, w.out_seg, msg.table, copy=True), None
        except BaseException as e:
            exc = SerializationError(
                f"{what} could not be unpickled in the parent: {type(e).__name__}: {e}"
            )
            exc.__cause__ = e
            return None, exc

    def _receive_segments(self, w: ProcessWorker, msg: Ok | Item) -> None:
        if not msg.new:
            return
        memfd = self._backend.memfd
        assert w.conn is not None
        fds = tr.recv_fds(w.conn, len(msg.new)) if memfd else [None] * len(msg.new)
        for ref, fd in zip(msg.new, fds, strict=True):
            w.out_seg = tr.Segment.receive(ref, memfd, fd)  # the previous one is unmapped

    def _on_exit(self, w: ProcessWorker) -> None:
        proc, conn = w.proc, w.conn
        assert proc is not None and conn is not None
        proc.join(1)
        code = proc.exitcode
        with self._lock:
            self._procs.pop(w.wid, None)
        with w.read_lock:
            # A reply its task's loop read and handed here (under this lock) ends its call
            # with the result, before the worker is reaped; a call handed here to send is
            # sent into the dead pipe, and fails below.
            self._run_soon(only=w)
            w.conn = None
            watch = w.watch
            if watch is not None and watch.loop.is_closed():
                w.watch = None
                self._backend.watches.discard(watch)
                watch = None
            if watch is None and not w.trio_waits:
                conn.close()
            else:  # a loop or a trio task still waits on it: it closes it when it lets go
                w.pending_close = conn
        with contextlib.suppress(ValueError):
            proc.close()  # its sentinel descriptor
        w.set_wake_fd(None)
        w.proc = None
        if w.req_seg is not None:
            w.req_seg.release()
        if w.control is not None:
            w.control.release()  # its mapping stays while the handle lives (see cancel())
        w.req_seg = w.out_seg = None
        if not self._backend.memfd:
            tr.unlink_prefix(f"{self._backend.prefix}w{w.wid}_")
        if w.stopping:
            self._core.worker_lost(w)
        elif not w.reported_ready:
            self._core.worker_lost(w, **self._start_failure(w, code))
        else:
            item = w.item
            err = w.crash_error(item, code) if item is not None else None
            self._core.worker_lost(w, item_error=err)

    def _start_failure(self, w: ProcessWorker, code: int | None) -> dict[str, Any]:
        from ._pool import MAIN_GUARD_HELP

        name = self._backend.name
        if code == MAIN_GUARD_EXIT:
            return {
                "start_error": WorkerStartError(
                    f"the workers of {name} cannot start: {MAIN_GUARD_HELP}"
                ),
                "fatal": True,
            }
        if w.start_error:
            return {
                "start_error": WorkerStartError(
                    f"a worker of {name} failed to start (exit code {code}):\n{w.start_error}"
                )
            }
        return {
            "start_error": WorkerStartError(
                f"a worker of {name} exited with code {code} while starting, before it could "
                "report anything (a crash in an import, a stray kill, the OOM killer)"
            ),
            "reported": False,
        }
