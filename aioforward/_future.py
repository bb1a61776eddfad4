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

    def running(self) -> bool:
        """True while a worker executes the call (not merely queued)."""
        item = self._item
        return item is not None and item.started and not self.done()

    def __await__(self) -> Generator[Any, None, T]:
        return _wait_one(self).__await__()


def _set_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_asyncio(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
    try:
        loop.call_soon_threadsafe(_set_waiter, waiter)
    except RuntimeError:  # the loop is closed: nobody waits any more
        pass


def waker() -> tuple[Callable[[], None], Callable[[], Any]]:
    """Return ``(wake, wait)``: ``wake`` is safe from any thread, ``wait`` is awaited here."""
    if sniffio.current_async_library() == "trio":
        import trio

        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        def wake_trio() -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        return wake_trio, event.wait
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    return (lambda: _wake_asyncio(loop, waiter)), (lambda: waiter)


async def _wait_one(fut: ForwardFuture[T]) -> T:
    if not fut.done():
        wake, wait = waker()
        fut.add_done_callback(lambda _f: wake())
        try:
            await wait()
        except BaseException:
            fut.cancel()
            raise
    return fut.result()


async def wait_all(futures: Sequence[ForwardFuture[Any]], labels: Sequence[str]) -> list[Any]:
    """Await every future; on the first failure cancel the others and raise it.

    Returns the results in order. The exception of the call that failed first
    (in time) is raised as itself, with a note ``labels[i]`` naming the call.
    """
    lock = threading.Lock()
    pending = [f for f in futures if not f.done()]
    left = [len(pending)]
    first: list[ForwardFuture[Any]] = [f for f in futures if f.done() and _failed(f)][:1]
    if left[0] and not first:
        wake, wait = waker()

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


def _failed(f: concurrent.futures.Future[Any]) -> bool:
    return f.cancelled() or f.exception() is not None
