"""MapResult: the results of ``Pool.map``, iterable with ``for`` and ``async for``."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._future import waker

if TYPE_CHECKING:
    from .._future import ForwardFuture

__all__ = ["MapResult"]

T = TypeVar("T")


class MapResult(Iterator[T], AsyncIterator[T]):
    """Results of :meth:`Pool.map`, iterable with ``for`` and ``async for``.

    Without ``max_in_flight`` every input was submitted when ``map()`` was
    called (``Executor.map``); with it, inputs are submitted as results are
    taken. ``timeout`` counts from the ``map()`` call. :meth:`close` (or leaving
    an ``async for`` early) cancels the calls still pending::

        results = pool.map(model, batches, timeout=30)
        try:
            for y in results:
                consume(y)
        finally:
            results.close()
    """

    def __init__(
        self,
        submit: Callable[[tuple[Any, ...]], ForwardFuture[T]],
        inputs: Iterator[tuple[Any, ...]],
        *,
        ordered: bool,
        limit: int | None,
        timeout: float | None,
    ) -> None:
        self._submit = submit
        self._inputs = inputs
        self._ordered = ordered
        self._limit = limit
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._inflight: deque[ForwardFuture[T]] = deque()
        self._done: deque[ForwardFuture[T]] = deque()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None
        self._exhausted = False
        self._top_up()  # Executor.map submits everything now; a lazy map its first window

    def _top_up(self) -> None:
        while not self._exhausted and (self._limit is None or len(self._inflight) < self._limit):
            try:
                args = next(self._inputs)
            except StopIteration:
                self._exhausted = True
                break
            try:
                fut = self._submit(args)
            except BaseException:
                self.close()
                raise
            self._inflight.append(fut)
            if not self._ordered:
                fut.add_done_callback(self._on_done)
        if self._exhausted:
            self._submit = _no_submit  # drop the pool: a finished map keeps nothing alive

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def _on_done(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._done.append(fut)  # type: ignore[arg-type]
            wake, self._wake = self._wake, None
        if wake is not None:
            wake()

    def _take(self) -> ForwardFuture[T] | None:
        """The next finished future (unordered mode), or None."""
        with self._lock:
            if self._done:
                fut = self._done.popleft()
                self._inflight.remove(fut)
                return fut
        return None

    def __iter__(self) -> MapResult[T]:
        return self

    def __next__(self) -> T:
        if not self._inflight:
            self._top_up()
            if not self._inflight:
                raise StopIteration
        try:
            if self._ordered:
                # wait while it is still in flight: a timeout cancels it with the rest
                result = self._inflight[0].result(self._remaining())
                self._inflight.popleft()
            else:
                concurrent.futures.wait(
                    list(self._inflight), self._remaining(), return_when="FIRST_COMPLETED"
                )
                taken = self._take()
                if taken is None:
                    raise TimeoutError("map() did not finish within its timeout")
                result = taken.result()
        except BaseException:
            self.close()
            raise
        self._top_up()
        return result

    def __aiter__(self) -> MapResult[T]:
        return self

    async def __anext__(self) -> T:
        if not self._inflight:
            self._top_up()
            if not self._inflight:
                raise StopAsyncIteration
        try:
            with anyio.fail_after(self._remaining()):
                if self._ordered:
                    result: T = await self._inflight[0]
                    self._inflight.popleft()
                else:
                    while (fut := self._take()) is None:
                        wake, wait = waker()
                        with self._lock:
                            ready = bool(self._done)
                            if not ready:
                                self._wake = wake
                        if not ready:
                            await wait()
                    result = await fut
        except BaseException:
            self.close()
            raise
        self._top_up()
        return result

    def close(self) -> None:
        """Cancel every call still pending and stop submitting new ones.

        Example: ``results.close()``."""
        self._exhausted = True
        self._submit = _no_submit
        for fut in self._inflight:
            fut.cancel()
        self._inflight.clear()

    cancel = close  # the name of earlier releases

    async def aclose(self) -> None:
        """Async form of :meth:`close`. Example: ``await results.aclose()``."""
        self.close()


def _no_submit(args: tuple[Any, ...]) -> Any:
    raise RuntimeError("this map() has finished")
