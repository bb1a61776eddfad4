"""ForwardFuture: a thread-safe future that any event loop can await.

A pool completes futures from its own threads (worker threads, the process
pool's supervisor), never from an event loop, so a future must be awaitable
from whatever loop the caller happens to run: asyncio, uvloop or trio. The
waiting side asks sniffio which library is running and parks the task in that
library's own primitive; the completing thread wakes it with the loop's
thread-safe hook (``call_soon_threadsafe`` / ``TrioToken.run_sync_soon``). No
thread per wait, no polling, no loop captured at submit time.

Cancellation of the waiting task cancels the future, which tells the pool: a
queued call is removed and never runs; a running one is released (see
:meth:`ForwardFuture.cancel`). The cancellation itself is always re-raised.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import sniffio

from .errors import add_note

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence

    from .pools._worker import WorkItem

T = TypeVar("T")

__all__ = ["ForwardFuture"]


class ForwardFuture(concurrent.futures.Future[T], Generic[T]):
    """The result of one scheduled forward pass; awaitable and thread-safe.

    It is a :class:`concurrent.futures.Future`, so sync code may block on
    :meth:`result` and ``asyncio.wrap_future`` accepts it, and it can be
    awaited directly on asyncio, uvloop and trio::

        fut = pool.submit(model, x)      # scheduled now
        ...                              # do other work
        y = await fut                    # or fut.result(timeout=5) from sync code

    Cancellation: :meth:`cancel` succeeds until the result is set. A queued call
    is removed and never runs. A running call releases the caller at once and
    is stopped at its next block boundary in the worker, which survives; where
    no boundary comes within the pool's grace period, a process pool kills and
    replaces the worker, and a thread or a GPU kernel keeps its slot until the
    work ends.
    """

    # The pool's work item, set by the pool before the future is handed out.
    _item: WorkItem | None = None
    # Told once, in the cancelling thread, when cancel() succeeds: the pool's core or the
    # Batcher, which drop the call, and so call set_running_or_notify_cancel() as an
    # executor's work loop does for a cancelled call it takes (concurrent.futures.wait and
    # as_completed count a cancelled future as done only then).
    _on_cancel: Callable[[ForwardFuture[Any]], None] | None = None
    # Hands the call to its reserved worker; set when the pool left that to the awaiting task
    # (PoolCore.submit(awaited=True)), which runs it first thing in __await__, with its
    # asyncio loop (None under trio). Returns the worker's reply reader, if it has one.
    _dispatch: Callable[[Any], Any] | None = None
    # The worker's reply reader, when the pool handed the call over in submit already.
    _reader: Callable[..., Any] | None = None

    def __init__(self) -> None:
        # concurrent.futures.Future.__init__, except that the condition is made only when a
        # thread waits (result(timeout), concurrent.futures.wait): a call's own path takes
        # the lock under it, which costs no Python frame.
        self._mutex = threading.RLock()  # re-entrant: concurrent.futures.wait() holds it and
        # then calls exception()
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        cond = self._cond
        if cond is None:
            with _conditions_lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition(self._mutex)
        return cond

    # The per-call path reads the state without the lock (one attribute read is atomic);
    # everything that changes it, or waits for it, takes the lock.
    def done(self) -> bool:
        return self._state in _DONE

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        """True while a worker executes the call (not merely queued)."""
        item = self._item
        return item is not None and item.started and not self.done()

    def result(self, timeout: float | None = None) -> T:
        if self._state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # type: ignore[assignment]  # no cycle through the traceback
            return self._result  # type: ignore[return-value]
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == FINISHED:  # no lock, and no condition made, for a finished call
            return self._exception
        return super().exception(timeout)

    def cancel(self) -> bool:
        """Cancel the call unless it has finished; return whether it is cancelled.

        A queued call is removed; a running one is asked to stop (see the class docstring).
        """
        with self._mutex:
            if self._state in (RUNNING, FINISHED):
                return False
            if self._state in _CANCELLED:
                return True
            self._state = CANCELLED
            cond = self._cond
            if cond is not None:
                cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        on_cancel = self._on_cancel
        if on_cancel is not None:
            on_cancel(self)
        return True

    def set_result(self, result: T) -> None:
        # Future.set_result, with the lock under the condition (runs once per call)
        with self._mutex:
            if self._state in _DONE:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = FINISHED
            for waiter in self._waiters:  # concurrent.futures.wait / as_completed
                waiter.add_result(self)
            cond = self._cond
            if cond is not None:  # threads blocked in result() or exception()
                cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def set_exception(self, exception: BaseException | None) -> None:
        with self._mutex:
            if self._state in _DONE:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = FINISHED
            for waiter in self._waiters:
                waiter.add_exception(self)
            cond = self._cond
            if cond is not None:
                cond.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[T]], object]) -> None:
        with self._mutex:
            if self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            concurrent.futures._base.LOGGER.exception("exception calling callback for %r", self)

    def __await__(self) -> Generator[Any, None, T]:
        dispatch, self._dispatch = self._dispatch, None
        reader, self._reader = self._reader, None
        if self._state in _DONE:
            if dispatch is not None:
                dispatch(None)  # timed out already: the worker still has to let the call go
            if reader is not None:
                yield from reader(self, None, [])  # returns at once, letting the read go
            return self.result()
        loop = None
        wait: Callable[[], Any] | None = None  # trio's
        box: list[Any] = []
        try:
            loop = running_asyncio_loop()
            if loop is not None:  # the per-call path on asyncio, uvloop: one callback, one wake-up
                box.append(loop.create_future())  # box[0]: what this task waits on now
                wakeups = _wakeups(loop)

                def wake_loop(_f: object) -> None:
                    wakeups.wake(box[0])

                self.add_done_callback(wake_loop)
            elif reader is None:  # trio (a reply reader waits on its own: see below)
                wake, wait = waker()
                self.add_done_callback(lambda _f: wake())
        finally:
            if dispatch is not None:
                reader = dispatch(loop)
        try:
            if reader is not None:
                yield from reader(self, loop, box)  # reads the reply here, in the loop
            if self._state not in _DONE:
                if loop is not None:
                    yield from box[0].__await__()
                else:
                    if wait is None:  # the reader let the call go before it ended
                        wake, wait = waker()
                        self.add_done_callback(lambda _f: wake())
                    yield from wait().__await__()
        except BaseException:
            self.cancel()
            raise
        return self.result()


_conditions_lock = threading.Lock()  # makes a future's condition once
_DONE = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED})
_CANCELLED = frozenset({CANCELLED, CANCELLED_AND_NOTIFIED})
assert PENDING not in _DONE


def _set_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Wakeups:
    """Wakes waiting tasks of one asyncio loop: at once in the loop's own thread (a task that
    read its reply itself), and from other threads once for all of those that completed
    together: the first completion schedules a drain (one ``call_soon_threadsafe``, one write
    to the loop's self-pipe), later ones before it runs only join the list. A Batcher
    completing 64 requests at once wakes the loop once instead of 64 times."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Future[None]] = []
        self._scheduled = False

    def wake(self, waiter: asyncio.Future[None]) -> None:
        """Any thread: ``waiter`` is to be set on the loop."""
        if asyncio._get_running_loop() is self.loop:  # not the thread that made us: a loop
            _set_waiter(waiter)  # stopped in one thread may run on in another
            return
        with self._lock:
            self._pending.append(waiter)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody waits any more
            with self._lock:
                self._pending.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for waiter in pending:
            _set_waiter(waiter)


_loop_local = threading.local()  # .wakeups: the _Wakeups of the loop this thread runs


def _wakeups(loop: asyncio.AbstractEventLoop) -> _Wakeups:
    """The running ``loop``'s _Wakeups (called in its thread)."""
    w: _Wakeups | None = getattr(_loop_local, "wakeups", None)
    if w is None or w.loop is not loop:
        w = _loop_local.wakeups = _Wakeups(loop)
    return w


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio (or uvloop) loop running this task, or None under trio: asked directly,
    since this runs for every awaited call (trio marks its thread for sniffio, in guest
    mode too)."""
    if sniffio.thread_local.name is not None:
        return None
    loop = asyncio._get_running_loop()
    if loop is None and sniffio.current_async_library() == "asyncio":  # e.g. trio-asyncio
        loop = asyncio.get_running_loop()
    return loop


def waker() -> tuple[Callable[[], None], Callable[[], Any]]:
    """Return ``(wake, wait)``: ``wake`` is safe from any thread, ``wait`` is awaited here."""
    loop = running_asyncio_loop()
    if loop is None:
        import trio

        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        def wake_trio() -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        return wake_trio, event.wait
    waiter: asyncio.Future[None] = loop.create_future()
    wakeups = _wakeups(loop)
    return (lambda: wakeups.wake(waiter)), (lambda: waiter)


async def wait_all(futures: Sequence[ForwardFuture[Any]], labels: Sequence[str]) -> list[Any]:
    """Await every future; on the first failure cancel the others and raise it.

    Returns the results in order. The exception of the call that failed first
    (in time) is raised as itself, with a note ``labels[i]`` naming the call.
    """
    lock = threading.Lock()
    for f in futures:
        if f.done():
            let_go(f)
    pending = [f for f in futures if not f.done()]
    left = [len(pending)]
    first: list[ForwardFuture[Any]] = [f for f in futures if f.done() and _failed(f)][:1]
    if left[0] and not first:
        wake, wait = waker()
        loop = running_asyncio_loop()

        def on_done(f: concurrent.futures.Future[Any]) -> None:
            # Runs in whichever thread completed f.
            with lock:
                left[0] -= 1
                if not first and _failed(f):
                    first.append(f)  # type: ignore[arg-type]
                fire = left[0] == 0 or (first and first[0] is f)
            if fire:
                wake()

        for f in pending:  # a future done meanwhile runs on_done at once: none is missed
            if f._reader is not None and loop is not None:
                _read_in_loop(loop, f, on_done)
            else:
                f.add_done_callback(on_done)
        try:
            await wait()
        except BaseException:
            for f in reversed(futures):  # queued ones first: a freed worker must not start them
                f.cancel()
            raise
    if first:
        bad = first[0]
        for f in reversed(futures):
            if f is not bad:
                f.cancel()
        try:
            bad.result()
        except BaseException as exc:
            add_note(exc, labels[futures.index(bad)])
            raise
    return [f.result() for f in futures]


_reading: set[asyncio.Task[None]] = set()  # the tasks of _read_in_loop, until they end


def _read_in_loop(
    loop: asyncio.AbstractEventLoop,
    f: ForwardFuture[Any],
    then: Callable[[concurrent.futures.Future[Any]], None],
) -> None:
    """Await ``f`` in a task of ``loop``, which reads the worker's reply there (see
    ``ForwardFuture._reader``), then call ``then(f)`` in the loop. One task per call of
    ``run_parallel`` on a process pool: the replies of two workers are read as they come,
    with no supervisor thread between the pipe and the loop (0.35 ms less for a pair of
    1 MB results here). ``then`` runs after the reader has let the pipe go, so that the
    waiting task, woken by it, finds the worker's pipe free for its next call."""

    async def read() -> None:
        try:
            await f
        except BaseException:  # noqa: BLE001, S110 - the outcome is f's: wait_all reads it
            pass  # (and a cancelled task cancelled f)
        if f.done():
            then(f)
        else:  # f was finished elsewhere
            f.add_done_callback(then)

    task = loop.create_task(read())
    _reading.add(task)
    task.add_done_callback(_reading.discard)


def let_go(f: ForwardFuture[Any]) -> None:
    """Let the reply reader of a finished future go unawaited (it held the worker's pipe for
    the task that was to await it: see ``ForwardFuture._reader``)."""
    reader, f._reader = f._reader, None
    if reader is not None:
        for _ in reader(f, None, []):  # returns at once for a finished call
            pass


def _failed(f: concurrent.futures.Future[Any]) -> bool:
    return f.cancelled() or f.exception() is not None
