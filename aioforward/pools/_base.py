"""Pool: the public API, and the core that owns every worker, written once for all backends.

The public :class:`Pool` is a thin face over a :class:`PoolCore`. The core owns
the workers (the set of live ones, the idle stack, how many are ready), the
FIFO queue of calls waiting for one, capacity and ``max_queued``, deadlines,
the restart policy, statistics and the lifecycle. A backend supplies two
small things: a :class:`Backend` (per-pool behaviour: preparing a call at
submit, loading modules, resources released at close) and its
:class:`~aioforward.pools._worker.Worker` class (start, run one call,
interrupt, stop). Nothing else counts workers.

Worker threads, supervisors and futures refer to the core, never to the
``Pool`` object, so a pool dropped without ``close()`` is garbage-collected and
its finalizer shuts the core down; an atexit hook does the same for every pool
still open when the interpreter exits (after finishing the calls already
submitted, as the standard executors do).

Lock order: ``PoolCore._lock`` may be held while taking the timer's lock;
never the other way round. Backends never call into the core while holding a
lock of their own, and the core never calls a worker or backend method (nor
completes a future) while holding its lock.

Restart policy: a worker that dies after it started (a crash, a kill on
timeout) is replaced at once, so capacity is back within one worker start.
Back-off (0.1 s, 0.2 s, 0.4 s ... 5 s) applies only to workers that die while
starting; waiting calls fail with ``WorkerStartError`` when a start failure was
reported (a traceback from the initializer) or after ``START_RETRIES`` silent
deaths in a row, and at once when the failure can never heal (the missing
``if __name__ == "__main__":`` guard).
"""

from __future__ import annotations

import abc
import concurrent.futures
import contextlib
import enum
import heapq
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import torch

# anyio imports its backend for an event loop on first use, in that loop's thread: a pool's
# first start froze the loop for 45-53 ms here, 4 ms with the backend imported before. So
# import it with aioforward, before any loop runs (trio's only in a program that uses trio).
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio

    if "trio" in sys.modules:
        import anyio._backends._trio

from .._call import Call, ModuleSpec, call, check_module, module_name
from .._future import ForwardFuture, let_go, running_asyncio_loop, wait_all
from .._registry import register_pool
from .._stats import Latency, PoolStats, Reservoir
from .._stream import DEFAULT_BUFFER, Channel, ForwardStream
from .._validate import check_int, check_timeout
from ..errors import PoolClosedError, QueueFullError, WorkerStartError, add_note
from ._map import MapResult
from ._worker import Worker, WorkItem

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["Backend", "Latency", "MapResult", "Pool", "PoolCore", "PoolStats"]

T = TypeVar("T")

# Deaths while starting tolerated in a row before waiting calls fail with WorkerStartError
# when the worker reported nothing (a stray SIGKILL, the OOM killer). Higher rides out more
# stray kills; lower fails faster when a worker crashes hard at every start.
START_RETRIES = 3
BACKOFF_MAX = 5.0  # seconds between start attempts at most
CLOSE_WARN_S = 10.0
"""A close (or ``shutdown(wait=True)``) still waiting for running calls after this long says
which, once (a ``RuntimeWarning``): a call that never returns would hold it silently."""


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Queued(enum.Enum):
    """What ``shutdown`` does with calls still waiting for a worker."""

    RUN = "run"  # Executor.shutdown(): they still run
    CANCEL = "cancel"  # shutdown(cancel_futures=True): their futures are cancelled
    FAIL = "fail"  # close(): they fail with PoolClosedError


class Backend(abc.ABC):
    """What one kind of pool adds to the core: its workers and per-pool resources.

    A backend holds options and shared state (shipped modules, a supervisor
    thread) but never a reference to the :class:`Pool`.
    """

    interrupt_on_cancel = False  # interrupt a cancelled call that overran its grace period
    kill_on_cancel = False  # interrupt a cancelled call at once, without a grace period
    # Seconds a cancelled or timed-out call has to stop at a block boundary before it counts
    # as overrun (and is interrupted, where the worker can be).
    cancel_grace = 1.0
    # Hand an awaited call to its worker in submit rather than when the task starts awaiting
    # it: right for a process, which then computes while the task gets ready to sleep; a
    # thread would wait for the GIL the submitting task holds meanwhile.
    dispatch_in_submit = False

    @abc.abstractmethod
    def new_worker(self, core: PoolCore) -> Worker:
        """A new, unstarted worker."""

    def prepare(self, c: Call) -> Any:
        """Check and serialise a call in ``submit``, before any worker is reserved."""
        return None

    def open(self, core: PoolCore) -> None:  # noqa: B027 - optional hook
        """Called once, when the first worker is about to start."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Called once, after every worker has exited: release what the pool held."""

    def join(self, timeout: float | None) -> None:  # noqa: B027 - optional hook
        """Wait for the backend's own threads after :meth:`close`."""

    def release_caller(self) -> None:  # noqa: B027 - optional hook
        """Called in the thread that closed the pool (the loop's thread for ``aclose``),
        after close: restore per-thread settings such as torch's thread count, which
        OpenMP keeps per thread (a worker thread is the wrong place to restore it)."""

    def load(self, modules: tuple[Any, ...]) -> None:
        """Load modules without running them (``warmup``, and the async API before a
        module's first call: see :meth:`unshipped`). Runs in a worker thread."""
        for m in modules:
            self.prepare(Call(m, (), {}))

    def unshipped(self, fn: Any) -> bool:
        """Whether a call of ``fn`` would first ship it (copy a module and its weights to
        where the workers read them). The async API then ships it in a worker thread
        (:meth:`load`) before it submits: that copy froze the loop for 185 ms with BERT-base
        here. Asked on every awaited call: keep it cheap."""
        return False

    def reload(self, module: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Ship ``module`` again where workers hold copies (threads share it: nothing to do)."""


class _Timer:
    """One thread per pool for deadlines and delayed restarts, started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cv = threading.Condition()
        # [when, seq, fn]: a list, so that cancel() can clear fn where it lies in the heap
        self._heap: list[list[Any]] = []
        self._dead = 0  # cancelled entries still in the heap
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def call_at(self, when: float, fn: Callable[[], None]) -> list[Any]:
        """Call ``fn`` in the timer's thread at ``when`` (``time.monotonic``); return the
        entry that :meth:`cancel` takes."""
        entry = [when, next(self._seq), fn]
        with self._cv:
            if self._stopped:
                return entry
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    def cancel(self, entry: list[Any] | None) -> None:
        """Forget ``entry`` (and what its function holds; None: nothing to do). The heap is
        rebuilt once most of it is cancelled, so that calls with long timeouts that ended do
        not pile up in it."""
        if entry is None:
            return
        with self._cv:
            if entry[2] is None or self._stopped:
                return
            entry[2] = None
            self._dead += 1
            if self._dead > 64 and 2 * self._dead > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapq.heapify(self._heap)
                self._dead = 0

    def stop(self, join: bool) -> None:
        with self._cv:
            self._stopped = True
            self._heap.clear()
            self._cv.notify()
            thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _main(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        fn = heapq.heappop(self._heap)[2]
                        if fn is not None:
                            break
                        self._dead -= 1
                        continue
                    self._cv.wait(self._heap[0][0] - now if self._heap else None)
            fn()
            del fn


_interpreter_exiting = False
_live_cores: set[PoolCore] = set()
_live_lock = threading.Lock()


class PoolCore:
    """Owns the workers of one pool and every count about them (see the module docstring)."""

    def __init__(
        self, backend: Backend, *, workers: int, max_queued: int | None, name: str
    ) -> None:
        self.backend = backend
        self.workers = workers
        self.max_queued = max_queued
        self.name = name
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # any change of state or counts
        self._state = _State.OPEN
        self._ending = False  # the last worker is gone: the backend is being closed
        self._given_up = False  # Ctrl-C again at exit: nobody waits for the threads any more
        self._started = False
        self._all: set[Worker] = set()  # live workers: starting, idle or busy
        self._idle: list[Worker] = []  # ready and idle; a stack keeps warm workers warm
        self._ready = 0
        self._busy = 0
        self._queue: deque[WorkItem] = deque()
        self._seq = itertools.count()
        self._completed = self._failed = self._cancelled = self._restarts = 0
        self._overran = 0
        self._lat_queue, self._lat_transfer, self._lat_compute = (
            Reservoir(),
            Reservoir(),
            Reservoir(),
        )
        self._add_queue = self._lat_queue.samples.append  # bound once: they run per call
        self._add_transfer = self._lat_transfer.samples.append
        self._add_compute = self._lat_compute.samples.append
        self._start_failures = 0  # deaths while starting in a row; a ready worker resets it
        self._start_error: BaseException | None = None  # waiting calls were failed with it
        self._fatal: BaseException | None = None  # no worker can ever start: submit fails
        self._stopped: list[Worker] = []  # workers asked to stop, joined at close
        self._timer = _Timer(f"{name}-timer")

    # ------------------------------------------------------------------ submission
    def submit(
        self,
        c: Call,
        timeout: float | None,
        stream: Channel | None = None,
        *,
        awaited: bool = False,
    ) -> ForwardFuture[Any]:
        """Schedule ``c``. ``awaited``: the caller awaits the future at once (``forward``); a
        call that gets an idle thread is then handed to it only once the awaiting task has
        registered its wake-up, so the worker does not wait for this thread's GIL while the
        task gets ready to sleep. A process (``Backend.dispatch_in_submit``) gets it at once,
        and computes meanwhile."""
        # The per-call path: every line here runs for every call, so it is kept short.
        if timeout is not None:
            check_timeout(timeout)
        if self._state is not _State.OPEN or _interpreter_exiting or self._fatal is not None:
            self._check_open()
        payload = self.backend.prepare(c)
        fut: ForwardFuture[Any] = ForwardFuture()
        deadline = None if timeout is None else time.monotonic() + timeout
        item = WorkItem(c, fut, deadline, next(self._seq), payload, stream)
        fut._item = item
        fut._on_cancel = self._on_cancel
        worker = None
        starts: list[Worker] = []
        with self._lock:
            if self._state is not _State.OPEN:
                self._check_open()  # closed meanwhile: raises
            if not self._started:
                starts = self._start_locked()
            if self._idle and not self._queue:
                worker = self._idle.pop()
                self._assign_locked(worker, item)
            else:
                if self.max_queued is not None and len(self._queue) >= self.max_queued:
                    n = len(self._queue)
                    raise QueueFullError(
                        f"{self.name}: {n} call{'s' if n != 1 else ''} already queued "
                        f"(max_queued={self.max_queued}); retry later or raise max_queued"
                    )
                self._queue.append(item)
            if deadline is not None:
                # The entry holds the item weakly, and the call's end cancels it: a result
                # must not live as long as its timeout.
                ref = weakref.ref(item)
                item.timer = self._timer.call_at(deadline, lambda: self._expire_ref(ref))
        if starts:
            self._start_workers(starts)
        if worker is not None:
            if awaited and self.backend.dispatch_in_submit:
                fut._reader = self._run_awaited(worker, item, running_asyncio_loop())
            elif awaited:
                fut._dispatch = lambda loop: self._run_awaited(worker, item, loop)
            else:
                self._run(worker, item)
        return fut

    async def call(self, c: Call, timeout: float | None) -> Any:
        """Run ``c`` for a task that awaits it at once (``forward``, ``aioforward.forward``,
        ``AsyncModule``): a module's first call ships it off the event loop first."""
        if self.backend.unshipped(c.module):
            await self.ship((c.module,))
        return await self.submit(c, timeout, awaited=True)

    async def ship(self, fns: Iterable[Any]) -> None:
        """Ship those of ``fns`` the backend has not shipped yet, in a worker thread (see
        ``Backend.unshipped``); raise what shipping raises (``SerializationError``)."""
        backend = self.backend
        todo = tuple(fn for fn in fns if backend.unshipped(fn))
        if todo:
            self._check_open()
            await anyio.to_thread.run_sync(backend.load, todo)

    def _check_open(self) -> None:
        if self._state is not _State.OPEN:
            raise PoolClosedError(f"cannot submit to a pool that has been closed ({self.name})")
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._fatal is not None:
            raise self._fatal

    def ensure_started(self) -> None:
        """Start the workers if this is the pool's first use (``wait_ready``, ``warmup``)."""
        self._check_open()
        with self._lock:
            starts = self._start_locked()
        self._start_workers(starts)

    def _start_locked(self) -> list[Worker]:
        if self._started:
            return []
        self._started = True
        with _live_lock:
            _live_cores.add(self)
        self.backend.open(self)
        return [self._new_worker_locked() for _ in range(self.workers)]

    def _new_worker_locked(self) -> Worker:
        w = self.backend.new_worker(self)
        self._all.add(w)
        return w

    def _start_workers(self, workers: list[Worker]) -> None:
        for w in workers:
            try:
                w.start()
            except BaseException as exc:
                err = exc if isinstance(exc, WorkerStartError) else WorkerStartError(str(exc))
                self.worker_lost(w, start_error=err, fatal=True)
                if not isinstance(exc, Exception):
                    raise

    def _assign_locked(self, w: Worker, item: WorkItem) -> None:
        item.started = True
        item.worker = w
        w.item = item
        self._busy += 1
        item.t_start = time.perf_counter()
        self._add_queue(item.t_start - item.t_submit)

    def _run(self, w: Worker, item: WorkItem) -> None:
        try:
            w.run(item)
        except Exception as exc:  # could not even send it (e.g. shared memory full)
            self.call_done(w, item, exc=exc)
        # KeyboardInterrupt/SystemExit propagate: the call may have been sent already, and
        # its reply will end it

    def _run_awaited(self, w: Worker, item: WorkItem, loop: Any) -> Any:
        """:meth:`_run` for a call its task awaits at once; returns the worker's reply reader
        for that task to drive, if it offers one (see ``Worker.run_awaited``)."""
        try:
            return w.run_awaited(item, loop)
        except Exception as exc:
            self.call_done(w, item, exc=exc)
            return None

    def _next_locked(self, w: Worker) -> tuple[WorkItem | None, bool]:
        """Worker ``w`` is free: the next queued call for it, or whether to stop it."""
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                self._assign_locked(w, item)
                return item, False
        if self._state is _State.OPEN:
            self._idle.append(w)
            return None, False
        self._stop_locked(w)
        return None, True

    def _stop_locked(self, w: Worker) -> None:
        w.stopping = True
        self._stopped.append(w)

    # ------------------------------------------------------------------ worker reports
    def worker_ready(self, w: Worker) -> None:
        """``w`` started and can take calls (called by the backend, any thread)."""
        with self._lock:
            if w not in self._all or w.stopping:
                return
            w.ready = True
            self._ready += 1
            self._start_failures = 0
            self._start_error = None
            item, stop = self._next_locked(w)
            self._changed.notify_all()
        if stop:
            w.stop()
        elif item is not None:
            self._run(w, item)

    def call_done(
        self,
        w: Worker,
        item: WorkItem,
        result: Any = None,
        exc: BaseException | None = None,
        *,
        retire: bool = False,
    ) -> None:
        """``item`` ended on ``w``. ``retire``: ``w`` must take no more calls; it is stopped
        and replaced at once."""
        fut = item.future
        abandoned = fut.done()  # cancelled or timed out earlier: the result is discarded
        nxt: WorkItem | None = None
        stop = False
        starts: list[Worker] = []
        if item.timer is not None:
            self._timer.cancel(item.timer)
        with self._lock:
            if w.item is not item:
                return  # the worker was lost meanwhile, and worker_lost ended the call
            self._busy -= 1
            w.item = None
            if not abandoned:
                if exc is None:
                    self._completed += 1
                    self._add_compute(item.compute_s)
                    self._add_transfer(item.transfer_s)
                else:
                    self._failed += 1
            if (retire or item.interrupted) and w in self._all:
                self._all.discard(w)
                self._ready -= 1
                self._stop_locked(w)
                stop = True
                if self._state is _State.OPEN or self._queue:
                    starts.append(self._new_worker_locked())
                    self._restarts += 1
            elif w in self._all:
                nxt, stop = self._next_locked(w)
            # Nobody waits on _changed for a call's end (only shutdown, for CLOSED): no notify.
        if not abandoned:
            _complete(fut, result, exc)
        item.release_inputs()
        del result, exc
        if stop:
            w.stop()
        if starts:
            self._start_workers(starts)
        if nxt is not None:
            self._run(w, nxt)
        if self._state is _State.CLOSING:  # a stale OPEN is harmless: shutdown checks itself
            self._maybe_closed()

    def worker_lost(
        self,
        w: Worker,
        *,
        item_error: BaseException | None = None,
        start_error: BaseException | None = None,
        reported: bool = True,
        fatal: bool = False,
    ) -> None:
        """``w`` exited. After ``stop`` that is the normal end; otherwise it died: its call
        fails with ``item_error`` and it is replaced (see the restart policy above).
        ``start_error``: why it died while starting; ``reported``: the worker said so itself
        (it will recur: fail waiting calls now) rather than dying silently (a stray kill:
        retry first); ``fatal``: no worker can ever start."""
        failed_queue: list[WorkItem] = []
        starts: list[Worker] = []
        err: BaseException | None = None
        with self._lock:
            if w not in self._all:
                return
            self._all.discard(w)
            if w in self._idle:
                self._idle.remove(w)
            was_ready, w.ready = w.ready, False
            if was_ready:
                self._ready -= 1
            item, w.item = w.item, None
            if item is not None:
                self._busy -= 1
                if not item.future.done():
                    self._failed += 1
            if not w.stopping and (self._state is _State.OPEN or self._queue):
                if was_ready:  # died while running or idle: replace at once
                    starts.append(self._new_worker_locked())
                    self._restarts += 1
                else:
                    self._start_failures += 1
                    err = start_error or WorkerStartError(
                        f"a worker of {self.name} died while starting (no traceback: it died "
                        "before reporting)"
                    )
                    if not reported:
                        add_note(err, f"{self._start_failures} starts in a row died this way")
                    if fatal:
                        self._fatal = err
                    if (
                        fatal
                        or (start_error is not None and reported)
                        or (self._start_failures >= START_RETRIES)
                    ):
                        if not self._ready:
                            self._start_error = err
                            failed_queue = [i for i in self._queue if not i.future.done()]
                            self._failed += len(failed_queue)
                            self._queue.clear()
                    if not fatal:
                        delay = min(BACKOFF_MAX, 0.1 * 2 ** (self._start_failures - 1))
                        self._timer.call_at(time.monotonic() + delay, self._refill)
            self._changed.notify_all()
        if item is not None:
            self._timer.cancel(item.timer)
            _complete(item.future, None, item_error or err or RuntimeError("worker lost"))
            item.release_inputs()
        for q in failed_queue:
            _complete(q.future, None, err)
        self._start_workers(starts)
        self._maybe_closed()

    def _refill(self) -> None:
        """Start workers missing after a back-off (the timer calls it)."""
        with self._lock:
            if not (self._state is _State.OPEN or self._queue) or self._fatal is not None:
                return
            missing = self.workers - len(self._all)
            starts = [self._new_worker_locked() for _ in range(missing)]
            self._restarts += len(starts)
        self._start_workers(starts)

    # ------------------------------------------------------------------ cancel & deadlines
    def _on_cancel(self, fut: ForwardFuture[Any]) -> None:
        """``fut`` was just cancelled (called once, in the cancelling thread)."""
        fut.set_running_or_notify_cancel()  # the call is dropped: tell concurrent.futures.wait
        item = fut._item
        if item is None:
            return
        with self._lock:
            self._cancelled += 1
            if not item.started:
                try:
                    self._queue.remove(item)
                except ValueError:
                    pass
                self._changed.notify_all()
                item.release_inputs()
                return
            w = item.worker
        if w is not None:
            b = self.backend
            self._stop_running(w, item, kill=b.interrupt_on_cancel, now=b.kill_on_cancel)
        self._maybe_closed()

    def _expire_ref(self, ref: weakref.ref[WorkItem]) -> None:
        item = ref()
        if item is not None:
            self._expire(item)

    def _expire(self, item: WorkItem) -> None:
        if item.future.done():
            return
        with self._lock:
            queued = not item.started
            if queued:
                try:
                    self._queue.remove(item)
                except ValueError:
                    return
                self._changed.notify_all()
            w = item.worker
        if not _complete(
            item.future, None, TimeoutError(f"{item.name} did not finish within its timeout")
        ):
            return  # cancelled meanwhile: counted as such
        with self._lock:
            self._failed += 1  # a running call's end will be discarded, not counted again
        if queued:
            item.release_inputs()
            self._maybe_closed()
        elif w is not None:
            self._stop_running(w, item, kill=True)

    def _stop_running(self, w: Worker, item: WorkItem, *, kill: bool, now: bool = False) -> None:
        """A running call was cancelled or timed out: ask it to stop at its next block
        boundary; if it still runs after the grace period (or ``now``), count it and
        (``kill``) interrupt it where the worker can be."""
        item.request_cancel()
        w.cancel(item)
        grace = 0.0 if now else self.backend.cancel_grace
        if grace <= 0:
            self._overrun(w, item, kill)
        else:
            self._timer.call_at(time.monotonic() + grace, lambda: self._overrun(w, item, kill))

    def _overrun(self, w: Worker, item: WorkItem, kill: bool) -> None:
        with self._lock:
            if w.item is not item:
                return  # it stopped in time
            self._overran += 1
            # Its reply may come in before the kill lands: the worker then takes no next call
            # (call_done retires it), or the kill would fail that call instead.
            item.interrupted = kill and w.interruptible
        if kill:
            w.interrupt(item)

    # ------------------------------------------------------------------ waiting
    def ready_count(self) -> int:
        return self._ready

    def startup_error(self) -> BaseException | None:
        return self._fatal or self._start_error

    def live_workers(self) -> list[Worker]:
        with self._lock:
            return list(self._all)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                workers=self._ready,
                busy=self._busy,
                queued=len(self._queue),
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                restarts=self._restarts,
                overran=self._overran,
                queue=self._lat_queue.latency(),
                transfer=self._lat_transfer.latency(),
                compute=self._lat_compute.latency(),
            )

    # ------------------------------------------------------------------ lifecycle
    @property
    def closed(self) -> bool:
        return self._state is not _State.OPEN

    @property
    def state(self) -> str:
        return self._state.value

    def shutdown(self, wait: bool, queued: _Queued) -> None:
        """Stop taking calls; deal with queued ones as ``queued`` says; stop each worker once
        it is idle; with ``wait``, return once every worker has exited."""
        to_stop: list[Worker] = []
        dropped: list[WorkItem] = []
        abandoned: list[tuple[Worker, WorkItem]] = []
        with self._lock:
            if self._state is _State.OPEN:
                self._state = _State.CLOSING
                if queued is not _Queued.RUN:
                    dropped = list(self._queue)
                    self._queue.clear()
                if queued is _Queued.FAIL:  # close(): nobody waits for abandoned calls
                    abandoned = [(w, w.item) for w in self._all if w.item and w.item.future.done()]
                    for w, item in abandoned:
                        item.interrupted = w.interruptible  # as in _overrun
                if not self._queue:
                    # idle workers stop now; busy ones when their call ends; starting ones too
                    to_stop = [w for w in self._all if w.item is None]
                    self._idle.clear()
                    for w in to_stop:
                        self._stop_locked(w)
                self._changed.notify_all()
        for item in dropped:
            if queued is _Queued.CANCEL:
                item.future.cancel()
            else:
                _complete(
                    item.future, None, PoolClosedError(f"{self.name} closed before the call ran")
                )
                item.release_inputs()
        for w in to_stop:
            w.stop()
        for w, item in abandoned:
            w.interrupt(item)  # where the backend can (a process is killed); else it ends
        self._maybe_closed()
        if wait:
            warn_at: float | None = time.monotonic() + CLOSE_WARN_S
            while True:
                late = None
                with self._lock:
                    if self._given_up:
                        return  # its threads are left to the interpreter's exit
                    if self._state is _State.CLOSED:
                        stopped, self._stopped = self._stopped, []
                        break
                    self._changed.wait(0.5)
                    if warn_at is not None and time.monotonic() >= warn_at:
                        warn_at = None
                        late = self._still_running()
                if late:
                    # (where warnings are errors, the close still has to finish its work)
                    with contextlib.suppress(RuntimeWarning):
                        warnings.warn(late, RuntimeWarning, stacklevel=_user_stacklevel())
            for w in stopped:
                w.join(10)
            self.backend.join(10)
            self._timer.stop(join=True)

    def _still_running(self) -> str | None:
        """What a close waiting for the running calls says (under the lock); None when no
        call runs (the workers are stopping)."""
        now = time.perf_counter()
        running = [(w, w.item) for w in self._all if w.item is not None]
        if not running:
            return None
        calls = ", ".join(f"{it.name} (running {now - it.t_start:.0f} s)" for _, it in running)
        killed = " or has its worker killed" if all(w.interruptible for w, _ in running) else ""
        return (
            f"{self.name}: closing has waited {CLOSE_WARN_S:g} s for {len(running)} running "
            f"call(s) to return: {calls}. It waits for as long as they run; a call that is "
            f"cancelled or times out stops at its next block boundary{killed}"
        )

    def abort(self, *, hurry: bool = False) -> None:
        """Cancel every call, queued or running, and stop the workers without waiting for
        those calls to end: a process worker running one is killed, a thread stops at its
        next block boundary (the interpreter's exit after Ctrl-C). Whatever state the pool
        is in: a ``shutdown`` that was finishing the queue is cut short. ``hurry`` (Ctrl-C
        came again): return without waiting for threads, which may never reach a block
        boundary (they are daemons: the interpreter's exit leaves them); killed processes
        are still waited for, or multiprocessing's own exit hook would race our reaping."""
        with self._lock:
            queued = list(self._queue)
            running = [(w, w.item) for w in self._all if w.item is not None]
            wait = not hurry or all(w.interruptible for w in self._all)
            if not wait:
                # A close already waiting (aclose in a thread of its own, which the exit
                # joins) stops waiting too, or the program would need Ctrl-C once more.
                self._given_up = True
                self._changed.notify_all()
        for item in queued:
            item.future.cancel()
        for w, item in running:
            item.future.cancel()
            if item.future.done():  # cancelled now, or abandoned earlier (a timeout)
                self._stop_running(w, item, kill=True, now=True)
        self.shutdown(wait=wait, queued=_Queued.CANCEL)

    def _maybe_closed(self) -> None:
        with self._lock:
            if self._state is not _State.CLOSING or self._all or self._queue or self._ending:
                return
            self._ending = True
        with _live_lock:
            _live_cores.discard(self)
        self._timer.stop(join=False)
        self.backend.close()  # before CLOSED: whoever waits for CLOSED sees it done
        with self._lock:
            self._state = _State.CLOSED
            self._changed.notify_all()

    def finalize(self) -> None:
        """The ``Pool`` was garbage-collected without ``close()``: finish queued calls, stop."""
        self.shutdown(wait=False, queued=_Queued.RUN)


_NOT_USER = (
    os.path.dirname(os.path.dirname(__file__)) + os.sep,  # aioforward itself
    os.path.dirname(anyio.__file__) + os.sep,  # aclose's thread
    threading.__file__,  # the interpreter's exit
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller name the first line of
    the stack outside aioforward, anyio and threading (the user's ``close()``); 1, the
    caller's own line, where there is none (``aclose`` closes in a thread of its own)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        if not frame.f_code.co_filename.startswith(_NOT_USER):
            return level
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return 1


def _complete(fut: ForwardFuture[Any], result: Any, exc: BaseException | None) -> bool:
    """Set the outcome unless the future is already done; return whether it was set."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        return False
    fut._item = None  # the future no longer keeps the call's inputs alive
    return True


def _at_exit() -> None:
    """Interpreter exit: refuse new calls, finish those submitted, stop every worker. After
    Ctrl-C (the program ends with KeyboardInterrupt, or it comes again meanwhile) the user
    wants out: calls still waiting or running are cancelled instead, and the workers stop
    now (see :meth:`PoolCore.abort`)."""
    global _interpreter_exiting
    _interpreter_exiting = True
    with _live_lock:
        cores = list(_live_cores)
    # The exception that ends the program is in sys.last_value when these hooks run (not in
    # an interactive session, where it may be an old one).
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt) and not hasattr(
        sys, "ps1"
    )
    hurry = False
    for core in cores:
        while True:
            try:
                if interrupted:
                    core.abort(hurry=hurry)
                else:
                    core.shutdown(wait=True, queued=_Queued.RUN)
                break
            except KeyboardInterrupt:
                # Ctrl-C while the calls finish: stop them all now. Again while they stop:
                # stop waiting for threads (a module that never returns would hold the
                # exit for ever), as the standard executors' exit does.
                hurry, interrupted = interrupted, True


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's workers: its exit must not wait for them."""
    global _live_lock
    _live_lock = threading.Lock()
    _live_cores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

# Like concurrent.futures: run before non-daemon threads are joined and before atexit
# hooks, so a hook submitting late is refused instead of hanging.
_register_atexit = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_at_exit)
else:  # pragma: no cover - every CPython we support has it
    import atexit

    atexit.register(_at_exit)


class Pool(concurrent.futures.Executor, abc.ABC):
    """The interface every aioforward pool offers.

    A pool runs forward passes somewhere other than the event loop and hands
    back :class:`~aioforward.ForwardFuture` objects. It belongs to no event loop
    and is thread-safe: the same pool serves successive asyncio loops, trio and
    sync threads. It is also a :class:`concurrent.futures.Executor`, so
    ``loop.run_in_executor(pool, fn, *args)`` works.

    Example::

        async with aioforward.ThreadPool(workers=2) as pool:
            y = await pool.forward(model, x)
            ya, yb = await pool.run_parallel(m1, m2, x)

    Lifecycle: constructing a pool starts nothing; workers start on the first
    ``submit``, ``warmup`` or ``wait_ready``. A pool still open when the
    interpreter exits, or dropped without ``close()``, finishes the calls
    already submitted and closes itself quietly.

    Capacity: at most one call per worker runs; further callers wait in FIFO
    order. With ``max_queued=N`` a caller that would be the N+1-th waiting one
    gets :class:`~aioforward.QueueFullError` at once.

    Cancellation: a queued call that is cancelled never runs. A running call is
    released at once and stopped cooperatively at its next block boundary (see
    :mod:`aioforward._cancel`), keeping its worker; one that does not stop
    within the pool's ``cancel_grace`` counts in ``stats().overran``, and a
    process pool then kills and replaces its worker.

    Timeouts: ``timeout=`` counts from submission; when it expires the caller
    gets the built-in :class:`TimeoutError` and the call is stopped as above.

    Attribute ``workers``: the calls the pool runs at once when all its workers
    are up (its capacity).
    """

    _kind = "pool"
    workers: int

    def __init__(
        self, backend: Backend, *, workers: int, max_queued: int | None, name: str | None
    ) -> None:
        check_int("max_queued", max_queued, 0, optional=True)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None, got {name!r}")
        self.workers = workers
        self._name = name or f"aioforward-{self._kind}"
        self._core = PoolCore(backend, workers=workers, max_queued=max_queued, name=self._name)
        # Collected without close(): shut the core down (it never refers back to the pool).
        self._finalizer = weakref.finalize(self, self._core.finalize)
        self._finalizer.atexit = False  # the exit hook above closes open pools first
        register_pool(self)

    # ------------------------------------------------------------------ submission
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> ForwardFuture[T]:
        """Schedule ``fn(*args, **kwargs)`` now and return its future at once.

        ``fn`` is usually an ``nn.Module`` or a :class:`~aioforward.ModuleSpec`
        (run without autograd); any callable is accepted so the pool works as a
        ``concurrent.futures.Executor``::

            fut = pool.submit(model, x)
            y = await fut            # or fut.result() in sync code
        """
        if not callable(fn) and not isinstance(fn, ModuleSpec):
            raise TypeError(f"fn must be an nn.Module, a ModuleSpec or a callable, got {fn!r}")
        return self._core.submit(Call(fn, args, kwargs), None)

    def submit_call(self, c: Call, *, timeout: float | None = None) -> ForwardFuture[Any]:
        """Schedule a :class:`~aioforward.Call`, optionally with a deadline.

        Example::

            fut = pool.submit_call(aioforward.call(model, x), timeout=2.0)
        """
        if not isinstance(c, Call):
            raise TypeError(f"submit_call() takes an aioforward.call(...), got {c!r}")
        return self._core.submit(c, timeout)

    # ------------------------------------------------------------------ async API
    async def forward(
        self,
        module: torch.nn.Module | ModuleSpec,
        /,
        *args: Any,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run one forward pass in this pool and return what ``module(*args, **kwargs)`` returns.

        Example::

            logits = await pool.forward(model, input_ids, attention_mask=mask, timeout=5)
        """
        check_module(module, "module")
        core = self._core  # core.call(), inlined: this is the per-call path
        if core.backend.unshipped(module):
            await core.ship((module,))
        return await core.submit(Call(module, args, kwargs), timeout, awaited=True)

    async def _call(self, c: Call, timeout: float | None) -> Any:
        """:meth:`forward` of a :func:`aioforward.call` (for the module-level API)."""
        return await self._core.call(c, timeout)

    async def run_parallel(
        self, *modules_and_args: Any, timeout: float | None = None, **kwargs: Any
    ) -> tuple[Any, ...]:
        """Run several modules at once in this pool; see :func:`aioforward.run_parallel`.

        Example::

            ya, yb = await pool.run_parallel(encoder_a, encoder_b, x)
        """
        calls = parse_parallel(modules_and_args, kwargs)
        return await run_calls(self, calls, timeout)

    def stream(
        self,
        fn: Callable[..., Iterable[T]] | torch.nn.Module | ModuleSpec,
        /,
        *args: Any,
        buffer: int = DEFAULT_BUFFER,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> ForwardStream[T]:
        """Run ``fn(*args, **kwargs)``, which returns an iterator, in a worker and stream what
        it yields: each item reaches the caller as soon as it is produced.

        ``fn`` is a generator function, a method of a module (``model.generate``;
        a process pool ships the module once, as for :meth:`forward`) or a
        module whose ``forward`` yields. At most ``buffer`` items wait for the
        consumer; a slower consumer pauses the producer. ``timeout`` bounds the
        whole stream. Leaving the loop early, ``close()`` or cancelling the
        consuming task closes the generator in the worker (its ``finally``
        runs) and keeps the worker. The stream occupies one worker while it
        runs, like a call::

            async for token in pool.stream(model.generate, ids, max_new_tokens=32):
                await send(token)
        """
        if not callable(fn) and not isinstance(fn, ModuleSpec):
            raise TypeError(
                f"fn must be a generator function, a module or a callable returning an "
                f"iterator, got {fn!r}"
            )
        check_int("buffer", buffer, 1)
        channel = Channel(buffer)
        fut = self._core.submit(Call(fn, args, kwargs), timeout, channel)
        return ForwardStream(fut, channel)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        ordered: bool = True,
        max_in_flight: int | None = None,
    ) -> MapResult[T]:
        """Run ``fn`` over inputs; iterate the results with ``for`` or ``async for``.

        As ``Executor.map``, every input is submitted at once and ``timeout``
        counts from this call for the whole iteration. With ``max_in_flight``
        inputs are submitted lazily, at most that many at a time (for long or
        endless inputs). Results come in input order unless ``ordered=False``.
        Leaving the loop early, or :meth:`MapResult.close`, cancels the rest::

            async for y in pool.map(model, batches, max_in_flight=8):
                consume(y)
        """
        check_int("max_in_flight", max_in_flight, 1, optional=True)
        check_int("chunksize", chunksize, 1)
        check_timeout(timeout)
        iterators = []
        for i, inputs in enumerate(iterables, 1):
            try:
                iterators.append(iter(inputs))
            except TypeError:
                raise TypeError(
                    "map takes one iterable of inputs per argument of fn, got "
                    f"{type(inputs).__name__} {inputs!r} as iterable {i}"
                ) from None
        core = self._core  # the result refers to the core, never to the pool
        core._check_open()
        return MapResult(
            lambda args: core.submit(Call(fn, args, {}), None),
            zip(*iterators, strict=False),
            ordered=ordered,
            limit=max_in_flight,
            timeout=timeout,
        )

    async def warmup(self, *modules: torch.nn.Module | ModuleSpec, example: Any = None) -> None:
        """Load modules into every worker ahead of traffic (and run ``example`` once each).

        Starts the workers and waits for them first (:meth:`wait_ready`).
        ``example`` is passed as the single positional argument (a tuple is
        spread as positional arguments); each worker runs each module once with
        it, since the calls are submitted while every worker is idle. Without it
        modules are only loaded where the backend has anything to load (a
        process pool places the weights in shared memory; workers map them on
        their first call)::

            await pool.warmup(encoder, decoder, example=torch.zeros(1, 16))
        """
        for i, m in enumerate(modules):
            check_module(m, f"modules[{i}]")
        await self.wait_ready()
        if example is None:  # in a worker thread: shipping or building a module takes time
            await anyio.to_thread.run_sync(self._core.backend.load, modules)
            return
        await self._core.ship(modules)
        args = example if isinstance(example, tuple) else (example,)
        futs: list[ForwardFuture[Any]] = []
        labels: list[str] = []
        for m in modules:
            for _ in range(self.workers):
                futs.append(self._core.submit(Call(m, args, {}), None))
                labels.append(f"raised by warmup of {module_name(m)}")
        await wait_all(futs, labels)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Start the workers if needed and wait until all of them can take calls.

        Raises :class:`~aioforward.WorkerStartError` when they cannot start,
        :class:`~aioforward.PoolClosedError` on a closed pool and the built-in
        ``TimeoutError`` after ``timeout`` seconds::

            await pool.wait_ready(timeout=30)
        """
        check_timeout(timeout)
        core = self._core
        core.ensure_started()
        deadline = None if timeout is None else time.monotonic() + timeout
        while core.ready_count() < self.workers:
            if (err := core.startup_error()) is not None:
                raise err
            if core.closed:
                raise PoolClosedError(f"{self._name} was closed while starting")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self._name}: {core.ready_count()} of {self.workers} workers ready "
                    f"after {timeout} s"
                )
            await anyio.sleep(0.005)

    def reload(self, module: torch.nn.Module) -> None:
        """Ship ``module`` again after it changed in this process (weights or structure).

        Workers that hold a copy (processes, Ray actors) use it until told; after
        ``reload`` the next call on each worker carries the new version. Threads
        share the module object itself, so there it does nothing::

            model.load_state_dict(new_weights)
            pool.reload(model)
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self._core.backend.reload(module)

    def worker_pids(self) -> list[int]:
        """Pids of the live workers that have a process of their own ([] for threads).

        Example: ``os.kill(pool.worker_pids()[0], signal.SIGKILL)``.
        """
        return [w.pid for w in self._core.live_workers() if w.pid is not None]

    # ------------------------------------------------------------------ stats & lifecycle
    def stats(self) -> PoolStats:
        """A :class:`PoolStats` snapshot. Example: ``pool.stats().busy``."""
        return self._core.stats()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` or :meth:`shutdown` was called."""
        return self._core.closed

    def close(self) -> None:
        """Stop accepting work, fail queued calls with ``PoolClosedError``, wait for running
        calls, stop the workers. Idempotent. Example: ``pool.close()``."""
        self._core.shutdown(wait=True, queued=_Queued.FAIL)
        self._core.backend.release_caller()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: stop accepting work; queued calls still run unless
        ``cancel_futures``, which cancels them; ``wait`` blocks until the workers exit.

        Example: ``pool.shutdown(wait=False, cancel_futures=True)``.
        """
        self._core.shutdown(wait, _Queued.CANCEL if cancel_futures else _Queued.RUN)
        if wait:
            self._core.backend.release_caller()

    async def aclose(self) -> None:
        """Close without blocking the event loop (runs :meth:`close` in a thread, shielded).

        Example: ``await pool.aclose()``."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._core.shutdown, True, _Queued.FAIL)
        self._core.backend.release_caller()

    async def __aenter__(self: _P) -> _P:
        if self.closed:  # say so here, not at the first call inside the block
            raise PoolClosedError(f"cannot use a pool that has been closed ({self._name})")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<{type(self).__name__} {self._name!r} {self._core.state} workers={s.workers}/"
            f"{self.workers} busy={s.busy} queued={s.queued}>"
        )


_P = TypeVar("_P", bound=Pool)


def parse_parallel(items: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Call]:
    """Split ``run_parallel``'s arguments into one :class:`Call` per module."""
    if not items:
        raise TypeError("run_parallel() needs at least one module (or aioforward.call(...))")
    if isinstance(items[0], Call):
        for i, c in enumerate(items):
            if not isinstance(c, Call):
                raise TypeError(
                    f"run_parallel(): argument {i} is {type(c).__name__}; when the first argument "
                    "is aioforward.call(...), every argument must be one"
                )
        if kwargs:
            raise TypeError(
                f"run_parallel(): keyword arguments {sorted(kwargs)} cannot be combined with "
                "aioforward.call(...) objects; pass them inside each call()"
            )
        return list(items)
    n = 0
    while n < len(items) and isinstance(items[n], torch.nn.Module | ModuleSpec):
        n += 1
    if n == 0:
        check_module(items[0], "run_parallel()'s first argument")
    args = items[n:]
    for i, a in enumerate(args, start=n):
        if isinstance(a, Call):
            raise TypeError(
                f"run_parallel(): argument {i} is aioforward.call({a.name}, ...) after plain "
                "modules; pass either modules followed by their shared arguments, or one "
                "aioforward.call(...) per module"
            )
    return [call(m, *args, **kwargs) for m in items[:n]]


async def run_calls(pool: Pool, calls: list[Call], timeout: float | None) -> tuple[Any, ...]:
    """Submit every call, then wait for all; a failed submit cancels those already submitted.

    On a process pool each call is submitted as awaited (``PoolCore.submit``), so that the
    waiting loop reads the replies itself (``wait_all``); elsewhere that would defer each
    call's start to its own task."""
    core = pool._core
    await core.ship(c.module for c in calls)  # first calls: off the event loop
    # (trio: each call's end wakes the task through the supervisor, as for a call not awaited)
    awaited = core.backend.dispatch_in_submit and running_asyncio_loop() is not None
    futures: list[ForwardFuture[Any]] = []
    try:
        for c in calls:
            futures.append(core.submit(c, timeout, awaited=awaited))  # noqa: PERF401
    except BaseException:
        for f in reversed(futures):  # queued ones first: a freed worker must not start them
            f.cancel()
            let_go(f)
        raise
    labels = [f"raised by module {i} ({c.name}) in run_parallel" for i, c in enumerate(calls)]
    return tuple(await wait_all(futures, labels))
