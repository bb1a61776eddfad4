"""Pool: what every backend shares, written once.

A pool owns *slots* (one per idle worker: a thread, a process, a stream) and a
FIFO queue of calls waiting for one. ``submit`` checks and prepares the call
(a process pool pickles it here, so an unpicklable module fails before any slot
is reserved), then either dispatches it to a free slot or queues it. A backend
only knows how to start, run and stop its own kind of work:

* ``_dispatch(item)``: run ``item`` on a reserved slot; call ``_finish`` when it ends;
* ``_interrupt(item)``: stop a running call by force if the backend can (a
  process can be killed, a thread cannot); the backend still calls ``_finish``;
* ``_shutdown_backend(wait)``: stop the workers.

The base class enforces capacity, ``max_queued`` back-pressure, deadlines (one
timer thread per pool, started on the first call with a timeout), the
cancellation semantics, statistics and the lifecycle. Everything is guarded by
one ``threading.Lock``; futures are completed outside it.
"""

from __future__ import annotations

import abc
import concurrent.futures
import enum
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import torch

from .._call import Call, ModuleSpec, call, check_module, module_name
from .._future import ForwardFuture, _waker, wait_all
from ..errors import PoolClosedError, QueueFullError
from ..monitor import quantiles

__all__ = ["Latency", "Pool", "PoolStats"]

T = TypeVar("T")

_RESERVOIR = 2048  # latency samples kept per kind: enough for a stable p99, bounded memory


@dataclass(frozen=True)
class Latency:
    """Latency quantiles in seconds over the most recent calls (0.0 when none)."""

    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool, from :meth:`Pool.stats`.

    ``busy`` counts slots reserved by calls (including calls abandoned by a
    cancel or timeout whose work has not ended yet); ``queued`` calls wait for a
    slot. ``queue``, ``transfer`` and ``compute`` split the latency of a call:
    waiting for a slot, moving data to and from a worker, running the module.
    """

    workers: int
    busy: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    restarts: int
    queue: Latency
    transfer: Latency
    compute: Latency


def _quantiles(samples: Iterable[float]) -> Latency:
    return Latency(*quantiles(samples))


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _WorkItem:
    """One call travelling through a pool."""

    __slots__ = (
        "call",
        "compute_s",
        "deadline",
        "future",
        "payload",
        "seq",
        "started",
        "t_start",
        "t_submit",
        "transfer_s",
        "worker",
    )

    def __init__(self, c: Call, future: ForwardFuture[Any], deadline: float | None, seq: int):
        self.call = c
        self.future = future
        self.deadline = deadline
        self.seq = seq
        self.started = False
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.compute_s = 0.0
        self.transfer_s = 0.0
        self.payload: Any = None  # what the backend prepared at submit (e.g. pickled bytes)
        self.worker: Any = None  # the backend's worker running it


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

    Capacity: at most one call per slot runs; further callers wait in FIFO
    order. With ``max_queued=N`` a caller that would be the N+1-th waiting one
    gets :class:`~aioforward.QueueFullError` at once.

    Cancellation: a queued call that is cancelled never runs. A running call is
    released at once; its result is discarded and its slot stays busy until the
    work ends (a backend that can kill the work, like ``ProcessPool`` with
    ``kill_on_cancel=True``, does so).

    Timeouts: ``timeout=`` counts from submission; when it expires the caller
    gets the built-in :class:`TimeoutError` and the backend stops the work if it
    can (a process pool kills and replaces the worker).

    Attribute ``workers``: the calls the pool runs at once when all its workers
    are up (its capacity).
    """

    _kind = "pool"
    workers: int

    def __init__(self, *, max_queued: int | None = None, name: str | None = None) -> None:
        if max_queued is not None:
            _check_int("max_queued", max_queued, 0)
        self._name = name or f"aioforward-{self._kind}"
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._state = _State.OPEN
        self._free = 0  # idle slots
        self._workers = 0  # slots in total (for stats)
        self._busy = 0
        self._queue: deque[_WorkItem] = deque()
        self._seq = itertools.count()
        self._completed = 0
        self._failed = 0
        self._cancelled = 0
        self._restarts = 0
        self._lat_queue: deque[float] = deque(maxlen=_RESERVOIR)
        self._lat_transfer: deque[float] = deque(maxlen=_RESERVOIR)
        self._lat_compute: deque[float] = deque(maxlen=_RESERVOIR)
        self._idle = threading.Condition(self._lock)  # notified when busy/queued drop
        self._timer: threading.Thread | None = None
        self._deadlines: list[tuple[float, int, _WorkItem]] = []
        self._timer_cv = threading.Condition(self._lock)

    # ------------------------------------------------------------------ backend hooks
    @abc.abstractmethod
    def _dispatch(self, item: _WorkItem) -> None:
        """Run ``item`` on a reserved slot; call :meth:`_finish` when it ends."""

    def _prepare(self, c: Call) -> Any:
        """Check/serialise a call before any slot is reserved (runs in ``submit``)."""
        return None

    def _interrupt(self, item: _WorkItem) -> None:
        """Stop a running call by force when the backend can (default: it cannot)."""

    @abc.abstractmethod
    def _shutdown_backend(self, wait: bool) -> None:
        """Stop the workers (called once, after the queue was drained or failed)."""

    # ------------------------------------------------------------------ slot accounting
    def _add_slot(self, *, new_worker: bool = False) -> None:
        """A worker became idle: run the next queued call on it, or keep it free."""
        with self._lock:
            if new_worker:
                self._workers += 1
            item = self._pop_queued_locked()
            if item is None:
                self._free += 1
                return
        self._run(item)

    def _remove_slot(self) -> None:
        """A worker left the pool (not idle, not busy any more)."""
        with self._lock:
            self._workers -= 1

    def _pop_queued_locked(self) -> _WorkItem | None:
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.started = True
                self._busy += 1
                return item
        return None

    def _run(self, item: _WorkItem) -> None:
        item.t_start = time.perf_counter()
        self._lat_queue.append(item.t_start - item.t_submit)
        try:
            self._dispatch(item)
        except BaseException as exc:  # the backend could not even start it
            self._finish(item, exc=exc, release=True)

    def _finish(
        self,
        item: _WorkItem,
        result: Any = None,
        exc: BaseException | None = None,
        *,
        release: bool = True,
    ) -> None:
        """The work of ``item`` ended. ``release=False``: its worker is gone, no slot returns."""
        fut = item.future
        abandoned = fut.done()  # cancelled or timed out earlier: the result is discarded
        nxt = None
        # Account first, complete the future second: a caller woken by the result must
        # already see the slot returned in stats().
        with self._lock:
            self._busy -= 1
            if exc is None and not abandoned:
                self._completed += 1
                self._lat_compute.append(item.compute_s)
                self._lat_transfer.append(item.transfer_s)
            elif exc is not None and not abandoned:
                self._failed += 1
            if release:
                nxt = self._pop_queued_locked()
                if nxt is None:
                    self._free += 1
            self._idle.notify_all()
        try:
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass
        if nxt is not None:
            self._run(nxt)

    # ------------------------------------------------------------------ submission
    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> ForwardFuture[T]:
        """Schedule ``fn(*args, **kwargs)`` now and return its future at once.

        ``fn`` is usually an ``nn.Module`` or a :class:`~aioforward.ModuleSpec`
        (run under ``torch.inference_mode()``); any callable is accepted so the
        pool works as a ``concurrent.futures.Executor``::

            fut = pool.submit(model, x)
            y = await fut            # or fut.result() in sync code
        """
        if not callable(fn) and not isinstance(fn, ModuleSpec):
            raise TypeError(f"fn must be an nn.Module, a ModuleSpec or a callable, got {fn!r}")
        return self.submit_call(Call(fn, args, kwargs))

    def submit_call(self, c: Call, *, timeout: float | None = None) -> ForwardFuture[Any]:
        """Schedule a :class:`~aioforward.Call`, optionally with a deadline.

        Example::

            fut = pool.submit_call(aioforward.call(model, x), timeout=2.0)
        """
        _check_timeout(timeout)
        if self._state is not _State.OPEN:
            raise PoolClosedError(f"cannot submit to a pool that has been closed ({self._name})")
        payload = self._prepare(c)
        fut: ForwardFuture[Any] = ForwardFuture()
        deadline = None if timeout is None else time.monotonic() + timeout
        item = _WorkItem(c, fut, deadline, next(self._seq))
        item.payload = payload
        fut._item = item
        run_now = False
        with self._lock:
            if self._state is not _State.OPEN:
                raise PoolClosedError(
                    f"cannot submit to a pool that has been closed ({self._name})"
                )
            if self._free > 0 and not self._queue:
                self._free -= 1
                self._busy += 1
                item.started = True
                run_now = True
            else:
                if self._max_queued is not None and len(self._queue) >= self._max_queued:
                    raise QueueFullError(
                        f"{self._name}: {len(self._queue)} calls already queued "
                        f"(max_queued={self._max_queued}); retry later or raise max_queued"
                    )
                self._queue.append(item)
            if deadline is not None:
                self._arm_timer_locked(item)
        fut.add_done_callback(self._on_future_done)
        if run_now:
            self._run(item)
        return fut

    def _on_future_done(self, fut: concurrent.futures.Future[Any]) -> None:
        if not fut.cancelled():
            return
        item = getattr(fut, "_item", None)
        if item is None:
            return
        with self._lock:
            self._cancelled += 1
            if not item.started:
                try:
                    self._queue.remove(item)
                except ValueError:
                    pass
                self._idle.notify_all()
                return
        self._interrupt_on_cancel(item)

    def _interrupt_on_cancel(self, item: _WorkItem) -> None:
        """A running call was cancelled; backends that opt in kill the work."""

    # ------------------------------------------------------------------ deadlines
    def _arm_timer_locked(self, item: _WorkItem) -> None:
        assert item.deadline is not None
        heapq.heappush(self._deadlines, (item.deadline, item.seq, item))
        if self._timer is None:
            self._timer = threading.Thread(
                target=self._timer_main, name=f"{self._name}-timer", daemon=True
            )
            self._timer.start()
        self._timer_cv.notify()

    def _timer_main(self) -> None:
        while True:
            expired: list[_WorkItem] = []
            with self._lock:
                while True:
                    if self._state is _State.CLOSED:
                        return
                    now = time.monotonic()
                    while self._deadlines and self._deadlines[0][0] <= now:
                        expired.append(heapq.heappop(self._deadlines)[2])
                    if expired:
                        break
                    wait = self._deadlines[0][0] - now if self._deadlines else None
                    self._timer_cv.wait(wait)
            for item in expired:
                self._expire(item)

    def _expire(self, item: _WorkItem) -> None:
        if item.future.done():
            return
        with self._lock:
            queued = not item.started
            if queued:
                try:
                    self._queue.remove(item)
                except ValueError:
                    return
                self._failed += 1
                self._idle.notify_all()
        try:
            item.future.set_exception(
                TimeoutError(f"{item.call.name} did not finish within its timeout")
            )
        except concurrent.futures.InvalidStateError:
            return
        if not queued:
            self._interrupt(item)

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
        return await self.submit_call(Call(module, args, kwargs), timeout=timeout)

    async def run_parallel(
        self, *modules_and_args: Any, timeout: float | None = None, **kwargs: Any
    ) -> tuple[Any, ...]:
        """Run several modules at once in this pool; see :func:`aioforward.run_parallel`.

        Example::

            ya, yb = await pool.run_parallel(encoder_a, encoder_b, x)
        """
        calls = parse_parallel(modules_and_args, kwargs)
        return await run_calls(self, calls, timeout)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        ordered: bool = True,
        max_in_flight: int | None = None,
    ) -> MapResult[T]:
        """Run ``fn`` over inputs, at most ``max_in_flight`` at a time; iterate results.

        Works with ``async for`` (the loop stays free) and plain ``for`` (like
        ``Executor.map``). Results come in input order unless ``ordered=False``.
        Leaving the loop early cancels the calls still in flight::

            async for y in pool.map(model, batches, max_in_flight=8):
                consume(y)
        """
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be None or an int >= 1, got {max_in_flight!r}")
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be an int >= 1, got {chunksize!r}")
        _check_timeout(timeout)
        limit = max_in_flight or max(2, 2 * max(1, self._workers))
        return MapResult(self, fn, zip(*iterables, strict=False), ordered, limit, timeout)

    async def warmup(self, *modules: torch.nn.Module | ModuleSpec, example: Any = None) -> None:
        """Load modules into every worker ahead of traffic (and run ``example`` once each).

        Waits for the workers first (:meth:`wait_ready`). ``example`` is passed
        as the single positional argument (a tuple is spread as positional
        arguments); each worker runs each module once with it, since the calls
        are submitted while every worker is idle. Without it modules are only
        loaded where the backend has anything to load (a process pool places
        the weights in shared memory; workers map them on their first call)::

            await pool.warmup(encoder, decoder, example=torch.zeros(1, 16))
        """
        for i, m in enumerate(modules):
            check_module(m, f"modules[{i}]")
        await self.wait_ready()
        if example is None:
            await self._load(modules)
            return
        args = example if isinstance(example, tuple) else (example,)
        futs: list[ForwardFuture[Any]] = []
        labels: list[str] = []
        for m in modules:
            more = self._warmup_futures(Call(m, args, {}))
            futs += more
            labels += [f"raised by warmup of {module_name(m)}"] * len(more)
        await wait_all(futs, labels)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every worker has started (immediate where workers start at once).

        Example: ``await pool.wait_ready(timeout=30)``.
        """

    async def _load(self, modules: tuple[torch.nn.Module | ModuleSpec, ...]) -> None:
        """Load modules without running them: what ``_prepare`` does at a first submit."""
        for m in modules:
            self._prepare(Call(m, (), {}))

    def _warmup_futures(self, c: Call) -> list[ForwardFuture[Any]]:
        """Futures that run ``c`` once on every worker (all idle: each takes one)."""
        return [self.submit_call(c) for _ in range(self.workers)]

    # ------------------------------------------------------------------ stats & lifecycle
    def stats(self) -> PoolStats:
        """A :class:`PoolStats` snapshot. Example: ``pool.stats().busy``."""
        with self._lock:
            return PoolStats(
                workers=self._workers,
                busy=self._busy,
                queued=len(self._queue),
                completed=self._completed,
                failed=self._failed,
                cancelled=self._cancelled,
                restarts=self._restarts,
                queue=_quantiles(self._lat_queue),
                transfer=_quantiles(self._lat_transfer),
                compute=_quantiles(self._lat_compute),
            )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._state is not _State.OPEN

    def close(self) -> None:
        """Stop accepting work, fail queued calls with ``PoolClosedError``, wait for running
        calls, stop the workers. Idempotent. Example: ``pool.close()``."""
        self.shutdown(wait=True, cancel_futures=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: with ``cancel_futures`` queued calls fail with
        ``PoolClosedError``; otherwise they still run before the workers stop."""
        with self._lock:
            if self._state is not _State.OPEN:
                first = False
            else:
                first = True
                self._state = _State.CLOSING
            dropped: list[_WorkItem] = []
            if cancel_futures:
                dropped = list(self._queue)
                self._queue.clear()
        for item in dropped:
            try:
                item.future.set_exception(
                    PoolClosedError(f"{self._name} closed before the call ran")
                )
            except concurrent.futures.InvalidStateError:
                pass
        if not first:
            if wait:
                self._wait_closed()
            return
        with self._lock:
            if wait:
                while self._busy or self._queue:
                    self._idle.wait(0.1)
        self._shutdown_backend(wait)
        with self._lock:
            self._state = _State.CLOSED
            self._timer_cv.notify_all()
            self._idle.notify_all()
        timer = self._timer
        if timer is not None and wait:
            timer.join()

    def _wait_closed(self) -> None:
        with self._lock:
            while self._state is not _State.CLOSED:
                self._idle.wait(0.1)

    async def aclose(self) -> None:
        """Close without blocking the event loop (runs :meth:`close` in a thread, shielded).

        Example: ``await pool.aclose()``."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close)

    async def __aenter__(self: _P) -> _P:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<{type(self).__name__} {self._name!r} {self._state.value} workers={s.workers} "
            f"busy={s.busy} queued={s.queued}>"
        )


_P = TypeVar("_P", bound=Pool)


def _check_int(name: str, value: object, low: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= ``low`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_number(name: str, value: object, what: str = "a number") -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a real number >= 0 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be {what} >= 0, got {value!r}")


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and (not isinstance(timeout, int | float) or not timeout >= 0):
        raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")


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
    return [call(m, *args, **kwargs) for m in items[:n]]


async def run_calls(pool: Pool, calls: list[Call], timeout: float | None) -> tuple[Any, ...]:
    futures = [pool.submit_call(c, timeout=timeout) for c in calls]
    labels = [f"raised by module {i} ({c.name}) in run_parallel" for i, c in enumerate(calls)]
    return tuple(await wait_all(futures, labels))


class MapResult(Iterator[T], AsyncIterator[T]):
    """Results of :meth:`Pool.map`, iterable with ``for`` and ``async for``."""

    def __init__(
        self,
        pool: Pool,
        fn: Callable[..., T],
        inputs: Iterator[tuple[Any, ...]],
        ordered: bool,
        limit: int,
        timeout: float | None,
    ) -> None:
        self._pool = pool
        self._fn = fn
        self._inputs = inputs
        self._ordered = ordered
        self._limit = limit
        self._timeout = timeout
        self._inflight: deque[ForwardFuture[T]] = deque()
        self._done: deque[ForwardFuture[T]] = deque()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None
        self._exhausted = False

    def _top_up(self) -> None:
        while not self._exhausted and len(self._inflight) < self._limit:
            try:
                args = next(self._inputs)
            except StopIteration:
                self._exhausted = True
                return
            fut = self._pool.submit_call(Call(self._fn, args, {}), timeout=self._timeout)
            self._inflight.append(fut)
            if not self._ordered:
                fut.add_done_callback(self._on_done)

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
        self._top_up()
        if not self._inflight:
            raise StopIteration
        try:
            if self._ordered:
                fut = self._inflight.popleft()
            else:
                concurrent.futures.wait(self._inflight, return_when="FIRST_COMPLETED")
                fut = self._take()  # type: ignore[assignment]
            return fut.result()
        except BaseException:
            self.cancel()
            raise

    def __aiter__(self) -> MapResult[T]:
        return self

    async def __anext__(self) -> T:
        self._top_up()
        if not self._inflight:
            raise StopAsyncIteration
        try:
            if self._ordered:
                return await self._inflight.popleft()
            while (fut := self._take()) is None:
                wake, wait = _waker()
                with self._lock:
                    ready = bool(self._done)
                    if not ready:
                        self._wake = wake
                if not ready:
                    await wait()
            return await fut
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel every call still in flight and stop submitting new ones."""
        self._exhausted = True
        for fut in self._inflight:
            fut.cancel()
        self._inflight.clear()

    async def aclose(self) -> None:
        self.cancel()
