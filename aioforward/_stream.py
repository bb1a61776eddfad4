"""ForwardStream: the items a worker yields, as an async (or sync) iterator.

A stream is one call whose function returns an iterator (a generator method
doing token-by-token generation, a module yielding per-chunk outputs). The
worker runs the iterator and pushes each item into a :class:`Channel` as soon
as it is produced; the caller takes them with ``async for`` (or ``for``).

Back-pressure: at most ``buffer`` items wait for the consumer. A worker thread
blocks in :meth:`Channel.put` while the buffer is full; a worker process holds
credits, one per free place, and the parent gives one back each time the
consumer takes an item. A slow consumer pauses the producer.

The end of the stream is the end of its call: the call's
:class:`~aioforward.ForwardFuture` completes after the last item. Its
exception (the generator raised, the worker crashed, the timeout expired)
reaches the consumer after the items already produced.

Leaving early (``break``, ``close()``, cancellation of the consuming task)
cancels the call: the worker closes the generator (its ``finally`` runs), the
slot is freed and the worker is kept.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from ._future import waker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._future import ForwardFuture

T = TypeVar("T")

__all__ = ["DEFAULT_BUFFER", "Channel", "ForwardStream", "iter_of", "not_a_call"]

DEFAULT_BUFFER = 4  # items produced ahead of the consumer: enough to hide a wake-up


def iter_of(value: Any, name: str) -> Iterator[Any]:
    """``iter(value)`` for a streaming call, or a ``TypeError`` that says what ``stream`` needs.

    Example: ``iter_of(fn(*args), "fn")``.
    """
    if isinstance(value, torch.Tensor):  # iterable, by rows: not what stream() is for
        raise TypeError(
            f"stream({name}, ...): {name}(...) returned a Tensor, not an iterator; stream "
            "runs a generator function, a module whose forward yields, or a callable that "
            "returns an iterator (for one result use forward or submit; to stream a "
            "tensor's rows on purpose, return iter(tensor))"
        )
    try:
        return iter(value)
    except TypeError:
        raise TypeError(
            f"stream({name}, ...): {name}(...) returned {type(value).__name__}, not an "
            "iterator; pass a generator function, a module whose forward yields, or a "
            "callable that returns an iterator"
        ) from None


def not_a_call(name: str) -> str:
    """The error for ``forward`` of a module whose forward yields."""
    return (
        f"{name}'s forward returned a generator: run it with pool.stream({name}, ...) (or "
        "aioforward.stream) to get its items, not with forward/submit"
    )


class Channel:
    """A bounded, thread-safe queue between one producer (a worker) and one consumer."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self._cv = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()
        self._closed = False  # the consumer left, or the call was cancelled: stop producing
        self._ended = False  # the call ended: nothing more will come
        self._wake: Callable[[], None] | None = None  # an async consumer waiting
        self.on_take: Callable[[], None] | None = None  # a taken item frees a place (credits)

    # ------------------------------------------------------------------ producer side
    def put(self, value: Any) -> bool:
        """Add an item, waiting while the buffer is full; False once the consumer left."""
        with self._cv:
            while len(self._items) >= self.buffer and not self._closed:
                self._cv.wait()
            if self._closed:
                return False
            self._items.append(value)
            wake, self._wake = self._wake, None
            self._cv.notify_all()
        if wake is not None:
            wake()
        return True

    def feed(self, value: Any) -> None:
        """Add an item without waiting (the producer holds a credit for its place)."""
        with self._cv:
            if self._closed:
                return
            self._items.append(value)
            wake, self._wake = self._wake, None
            self._cv.notify_all()
        if wake is not None:
            wake()

    def stop(self) -> None:
        """Stop the producer (cancel, timeout); items already there stay for the consumer."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def stopped(self) -> bool:
        return self._closed

    def end(self) -> None:
        """The call ended (its future is done)."""
        with self._cv:
            self._ended = True
            wake, self._wake = self._wake, None
            self._cv.notify_all()
        if wake is not None:
            wake()

    # ------------------------------------------------------------------ consumer side
    def take(self, wake: Callable[[], None] | None = None) -> tuple[bool, bool, Any]:
        """``(got, ended, item)``. When nothing is there and the call has not ended, ``wake``
        (if given) is called once something is."""
        with self._cv:
            if self._items:
                value = self._items.popleft()
                self._cv.notify_all()
                got = True
            else:
                if not self._ended and wake is not None:
                    self._wake = wake
                return False, self._ended, None
        if got and self.on_take is not None:
            self.on_take()
        return True, False, value

    def take_blocking(self, timeout: float | None) -> tuple[bool, bool, Any]:
        with self._cv:
            if not self._cv.wait_for(lambda: self._items or self._ended, timeout):
                raise TimeoutError(f"no stream item within {timeout} s")
        return self.take()

    def close(self) -> None:
        """The consumer left: drop what is buffered and stop the producer."""
        with self._cv:
            self._closed = True
            self._items.clear()
            self._wake = None
            self._cv.notify_all()


class ForwardStream(Generic[T]):
    """The items of a streaming call, in order, as they are produced.

    Iterate it with ``async for`` on any event loop, or with ``for`` in sync
    code. Leaving the loop early closes it (when the stream object is dropped;
    use ``async with`` to close it at a point of your choice)::

        async with pool.stream(model.generate, ids, max_new_tokens=32) as tokens:
            async for token in tokens:
                print(token)

    An exception raised by the generator, a crash of the worker
    (``WorkerCrashedError``) or the stream's ``timeout`` (``TimeoutError``) is
    raised after the items produced before it.
    """

    def __init__(self, future: ForwardFuture[Any], channel: Channel) -> None:
        self._future = future
        self._channel = channel
        self._closed = False
        future.add_done_callback(lambda _f: channel.end())

    @property
    def future(self) -> ForwardFuture[Any]:
        """The call behind the stream: done when the stream ends."""
        return self._future

    def close(self) -> None:
        """Stop the stream: the worker closes the generator and takes other calls.

        Example: ``stream.close()``; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._channel.close()
        self._future.cancel()

    async def aclose(self) -> None:
        """:meth:`close`, for ``contextlib.aclosing``. Example: ``await stream.aclose()``."""
        self.close()

    def __del__(self) -> None:
        # `break` out of `async for pool.stream(...)` drops the stream: stop the worker.
        if not getattr(self, "_closed", True):
            self.close()

    def _end(self) -> None:
        self._closed = True
        fut = self._future
        if fut.cancelled():
            raise concurrent.futures.CancelledError("the stream was cancelled")
        exc = fut.exception()
        if exc is not None:
            raise exc

    # ------------------------------------------------------------------ async
    def __aiter__(self) -> ForwardStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._closed:
            raise StopAsyncIteration
        got, ended, value = self._channel.take()
        while not got:
            if ended:
                self._end()
                raise StopAsyncIteration
            wake, wait = waker()
            got, ended, value = self._channel.take(wake)
            if got or ended:
                continue
            try:
                await wait()
            except BaseException:
                self.close()
                raise
            got, ended, value = self._channel.take()
        return value  # type: ignore[no-any-return]

    async def __aenter__(self) -> ForwardStream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sync
    def __iter__(self) -> ForwardStream[T]:
        return self

    def __next__(self) -> T:
        if self._closed:
            raise StopIteration
        while True:
            got, ended, value = self._channel.take_blocking(None)
            if got:
                return value  # type: ignore[no-any-return]
            if ended:
                self._end()
                raise StopIteration

    def __enter__(self) -> ForwardStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ended" if self._future.done() else "open")
        return f"<ForwardStream {state}>"
