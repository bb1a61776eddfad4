"""Batcher: concurrent single-sample calls coalesced into one batched forward pass.

A server that gets one request at a time wastes most of a model's throughput:
a batch of 32 rows costs far less than 32 calls of one row. ``Batcher``
collects the samples that callers send concurrently, stacks them along a new
dimension 0, runs one forward pass in a pool, and hands each caller its own
row of the output::

    caller ─ await batcher(x) ─┐                     ┌─ out[0] ─> caller
    caller ─ await batcher(x) ─┼─ stack ─> pool ─────┼─ out[1] ─> caller
    caller ─ await batcher(x) ─┘  (full, or a pool   └─ out[2] ─> caller
                                   slot is free)

A batch runs as soon as a pool slot is free for it, so at low load a sample
waits for nobody, and under load samples pile up into large batches while the
slots compute: batch size follows load, with no delay to tune. ``max_delay``
makes a sample wait for company even when a slot is free (larger batches at
low load, for accelerators that want them, at that much latency).

Samples are grouped by structure and by each tensor's shape, dtype and device
(plus every non-tensor argument's value), so samples that cannot be stacked
never share a batch: they go in batches of their own. A flusher thread stacks
the samples, so the event loop never copies a batch, and the Batcher belongs
to no event loop (as the pools do).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import torch

from . import _registry
from ._api import DEFAULT, Default, resolve_pool
from ._call import Call, ModuleSpec, check_module, module_name
from ._future import ForwardFuture, running_asyncio_loop
from ._tree import LEAF as _LEAF
from ._tree import Spec, flatten, unflatten
from ._validate import check_int, check_number, check_timeout
from .errors import PoolClosedError
from .pools._base import Pool

if TYPE_CHECKING:
    from collections.abc import Hashable, Sequence

__all__ = ["Batcher", "BatcherStats"]

_IDLE_EXIT_S = 1.0  # the flusher thread exits after this long without work; restarts on demand


@dataclass(frozen=True)
class BatcherStats:
    """Counters of a :class:`Batcher` (``batcher.stats()``).

    ``batches`` forward passes ran with ``samples`` samples in all (so
    ``samples / batches`` is the mean batch size); ``largest`` is the largest
    batch; ``pending`` samples wait for their batch to fill or time out.
    """

    batches: int
    samples: int
    largest: int
    pending: int


# Where a sample's row goes: the ForwardFuture that ``submit`` returned, or the asyncio future
# of a caller that awaits ``batcher(x)`` on asyncio or uvloop (set in its loop's thread).
_Sink = ForwardFuture[Any] | asyncio.Future[Any]


class _Batch:
    __slots__ = ("deadline", "futures", "key", "leaves", "loop", "out", "spec")

    def __init__(
        self, key: Hashable, spec: Spec, deadline: float, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.key = key
        self.spec = spec
        self.deadline = deadline  # runs when a slot is free and this time has come
        self.leaves: list[list[Any]] = []
        self.futures: list[_Sink] = []
        # The loop whose asyncio futures are all of ``futures``; None if any is not (see
        # _deliver: the rows then go to each future's loop, sorted there one by one).
        self.loop = loop
        self.out: concurrent.futures.Future[Any] | None = None  # the pool's call, once run

    def abandon(self, f: Any) -> None:
        """A caller's future ended: cancel the pool's call if it was the last caller to leave
        (checking all of them only when this one was cancelled, or it would be quadratic)."""
        out = self.out
        if out is not None and f.cancelled() and all(g.cancelled() for g in self.futures):
            out.cancel()


class Batcher:
    """Coalesce concurrent single-sample calls of ``module`` into batched forward passes.

    Each caller passes one sample, without the batch dimension; tensors are
    stacked along a new dimension 0 and every tensor in the output is split
    along dimension 0, so each caller gets back what it would get from a batch
    of one, squeezed::

        batcher = aioforward.Batcher(classifier, max_batch_size=32, max_delay=0.005)
        async with batcher:
            logits = await batcher(image)          # image: 3x224x224 -> logits: 1000

    A batch runs when it holds ``max_batch_size`` samples, or as soon as fewer
    than ``max_in_flight`` of this Batcher's batches are running (default: the
    pool's ``workers``) and its first sample has waited ``max_delay`` seconds
    (default 0). So at low load a sample runs at once, alone, and under load
    the samples that arrive while the slots compute form the next batches.
    Batches run in ``pool`` (the default pool, looked up at each batch, when
    not given).

    The module must return one row per sample along dimension 0 in each
    output tensor (non-tensor outputs are given to every caller as they are);
    otherwise every caller of that batch gets ``ValueError``. An exception
    raised by the module reaches every caller of that batch.

    Cancellation and ``timeout=``: a sample cancelled before its batch runs
    leaves the batch; one cancelled after is released at once and its row is
    discarded; a batch whose callers all left is cancelled in the pool.
    """

    def __init__(
        self,
        module: torch.nn.Module | ModuleSpec,
        pool: Pool | Default = DEFAULT,
        *,
        max_batch_size: int = 32,
        max_delay: float = 0.0,
        max_in_flight: int | None = None,
    ) -> None:
        check_module(module, "module")
        if pool is not DEFAULT and not isinstance(pool, Pool):
            raise TypeError(f"pool must be an aioforward Pool or aioforward.DEFAULT, got {pool!r}")
        check_int("max_batch_size", max_batch_size, 1)
        check_number("max_delay", max_delay)
        if max_in_flight is not None:
            check_int("max_in_flight", max_in_flight, 1)
        self.module = module
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_delay = float(max_delay)
        self.max_in_flight = max_in_flight
        self._name = f"Batcher({module_name(module)})"
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._open: dict[Hashable, _Batch] = {}  # key -> the batch still filling
        self._ready: list[_Batch] = []  # full batches: they run whatever the slots
        self._in_flight = 0  # batches submitted to the pool and not finished
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batches = self._samples = self._largest = 0
        _registry.register_batcher(self)  # for aioforward.metrics (weakly)

    # ------------------------------------------------------------------ calling
    async def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run one sample through the next batch and return its row of the output.

        Example: ``probs = await batcher(x, timeout=1.0)``. ``timeout`` raises
        the built-in ``TimeoutError``.
        """
        if timeout is not None:
            check_timeout(timeout)
        loop = running_asyncio_loop()
        if loop is None:  # trio: through a ForwardFuture
            fut: Any = self.submit(*args, **kwargs)
            batch = None
        else:
            # On asyncio and uvloop the row goes straight into a future of this loop: no
            # thread-safe future, callback or hand-off of its own per request; a batch's
            # rows reach each loop in one call (see _deliver).
            fut = loop.create_future()
            batch = self._add(args, kwargs, fut, loop)
        try:
            if timeout is None:  # no cancel scope: it costs more than the rest of the call
                return await fut
            with anyio.fail_after(timeout):
                return await fut
        finally:
            if batch is not None and fut.cancelled():  # this caller left (cancel, timeout)
                batch.abandon(fut)

    def submit(self, *args: Any, **kwargs: Any) -> ForwardFuture[Any]:
        """Add one sample to the next batch; return its future at once (thread-safe).

        Example::

            fut = batcher.submit(x)
            row = await fut          # or fut.result() from sync code
        """
        fut: ForwardFuture[Any] = ForwardFuture()
        fut._on_cancel = _notify_cancelled
        batch = self._add(args, kwargs, fut, None)
        fut.add_done_callback(batch.abandon)
        return fut

    def _add(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        fut: _Sink,
        loop: asyncio.AbstractEventLoop | None,
    ) -> _Batch:
        """Put one sample in the batch it can share; return that batch. ``loop`` is the loop
        of ``fut``, an asyncio future; None for a ForwardFuture."""
        if not kwargs and len(args) == 1 and type(args[0]) is torch.Tensor:
            # The common request, one plain tensor: a flat key of what _signature compares
            # (half the cost of the general key, on the event loop's thread, per request).
            x = args[0]
            leaves, spec = [x], _ONE_TENSOR
            key: Hashable = (x.shape, x.dtype, x.device, x.requires_grad)
        else:
            leaves, spec = flatten((args, kwargs))
            key = (spec, tuple([_signature(v) for v in leaves]))
        with self._lock:  # (the Condition's lock: notify() below is allowed)
            if self._closed:
                raise PoolClosedError(f"cannot submit to {self._name}: it has been closed")
            batch = self._open.get(key)
            wake = batch is None  # a new batch: the flusher has a new deadline to track
            if batch is None:
                deadline = time.monotonic() + self.max_delay
                batch = self._open[key] = _Batch(key, spec, deadline, loop)
            elif batch.loop is not loop:
                batch.loop = None
            batch.leaves.append(leaves)
            batch.futures.append(fut)
            if len(batch.futures) >= self.max_batch_size:
                del self._open[key]
                self._ready.append(batch)
                wake = True
            if self._thread is None:
                self._start_thread_locked()
            if wake:  # a sample joining a waiting batch changes nothing for the flusher
                self._cv.notify()
        return batch

    # ------------------------------------------------------------------ flushing
    def _start_thread_locked(self) -> None:
        self._thread = threading.Thread(
            target=self._flusher, name=f"aioforward-batcher-{id(self):x}", daemon=True
        )
        self._thread.start()

    def _flusher(self) -> None:
        # Stacking a batch is a small copy: on this thread alone (OpenMP keeps the count per
        # thread), or the OpenMP team it would start here spins on the cores the forward
        # passes need for milliseconds after every batch.
        torch.set_num_threads(1)
        try:
            self._flush()
        except BaseException as exc:  # cannot happen; fail the waiting samples, not hang them
            with self._cv:
                stranded = self._ready + list(self._open.values())
                self._ready, self._open = [], {}
                if self._thread is threading.current_thread():
                    self._thread = None  # the next submit starts a new flusher
            for batch in stranded:
                _deliver(batch.futures, batch.loop, exc=exc)
            raise

    def _flush(self) -> None:
        while True:
            with self._cv:
                due, wait = self._due_locked()
                while not due:
                    if self._closed:
                        self._thread = None
                        return
                    if not self._cv.wait(wait if wait is not None else _IDLE_EXIT_S):
                        if wait is None and not self._open and not self._ready:
                            self._thread = None  # idle: the next submit starts a new flusher
                            return
                    due, wait = self._due_locked()
                self._in_flight += len(due)
            for batch in due:
                self._run(batch)

    def _due_locked(self) -> tuple[list[_Batch], float | None]:
        """Take the batches to run now; also say how long until the next may be due."""
        due, self._ready = self._ready, []
        if self._closed:
            due += self._open.values()
            self._open.clear()
            return due, None
        limit = self.max_in_flight
        if limit is None:
            try:
                limit = resolve_pool(self.pool).workers
            except Exception:  # e.g. the default pool was closed: every batch runs now and
                limit = len(self._open) + len(due) + self._in_flight  # fails in _run with it
        now, wait = time.monotonic(), None
        for key, batch in list(self._open.items()):  # oldest first
            if self._in_flight + len(due) >= limit:
                return due, None  # a finishing batch notifies
            if batch.deadline <= now:
                del self._open[key]
                due.append(batch)
            else:
                wait = batch.deadline - now if wait is None else min(wait, batch.deadline - now)
        return due, wait

    def _run(self, batch: _Batch) -> None:
        live = [i for i, f in enumerate(batch.futures) if not f.cancelled()]
        if not live:
            self._done_one()
            return
        futures = [batch.futures[i] for i in live]
        try:
            columns = zip(*(batch.leaves[i] for i in live), strict=True)
            stacked = [
                torch.stack(col) if isinstance(col[0], torch.Tensor) else col[0] for col in columns
            ]
            args, kwargs = unflatten(batch.spec, iter(stacked))
            pool = resolve_pool(self.pool)
            out = pool.submit_call(Call(self.module, tuple(args), dict(kwargs)))
        except BaseException as exc:
            self._done_one()
            _deliver(futures, batch.loop, exc=exc)
            return
        with self._lock:
            self._batches += 1
            self._samples += len(futures)
            self._largest = max(self._largest, len(futures))
        batch.out = out
        batch.abandon(futures[0])  # every caller may have left while it was submitted
        out.add_done_callback(lambda o: self._split(o, futures, batch.loop))

    def _done_one(self) -> None:
        with self._cv:
            self._in_flight -= 1
            self._cv.notify()  # a slot is free: the flusher may start the next batch

    def _split(
        self,
        out: concurrent.futures.Future[Any],
        futures: list[_Sink],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self._done_one()
        if out.cancelled():
            _deliver(futures, loop, cancel=True)
            return
        exc = out.exception()
        if exc is not None:
            _deliver(futures, loop, exc=exc)
            return
        try:
            rows = self._rows(out.result(), len(futures))
        except Exception as e:  # a bad output: every caller of the batch gets the error
            _deliver(futures, loop, exc=e)
            return
        _deliver(futures, loop, rows)

    def _rows(self, output: Any, n: int) -> Sequence[Any]:
        """Split a batch's ``output`` into the ``n`` callers' rows."""
        leaves, spec = flatten(output)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != n):
                raise ValueError(
                    f"{self._name}: the module returned a tensor of shape {tuple(leaf.shape)} "
                    f"for a batch of {n} samples; each output tensor needs one row per "
                    "sample along dimension 0"
                )
        # Each tensor split at once (unbind: the same views as indexing, in one call).
        columns = [
            leaf.unbind(0) if isinstance(leaf, torch.Tensor) else (leaf,) * n for leaf in leaves
        ]
        if spec == _LEAF:  # the module returned one tensor (or value): each row as it is
            return columns[0]
        if not columns:  # no leaves at all (e.g. an empty tuple): each caller gets it
            return [unflatten(spec, iter(())) for _ in range(n)]
        return [unflatten(spec, iter(row)) for row in zip(*columns, strict=True)]

    # ------------------------------------------------------------------ lifecycle
    def stats(self) -> BatcherStats:
        """Counters so far. Example: ``s = batcher.stats(); s.samples / s.batches``."""
        with self._lock:
            pending = sum(len(b.futures) for b in self._open.values())
            pending += sum(len(b.futures) for b in self._ready)
            return BatcherStats(self._batches, self._samples, self._largest, pending)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called. Example: ``if not batcher.closed: ...``."""
        return self._closed

    def close(self) -> None:
        """Run the samples already waiting, refuse new ones, stop the flusher thread.

        Example: ``batcher.close()`` (or use ``with`` / ``async with``).
        """
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    async def aclose(self) -> None:
        """Close without blocking the event loop. Example: ``await batcher.aclose()``."""
        await anyio.to_thread.run_sync(self.close)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Batcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<{self._name} max_batch_size={self.max_batch_size} "
            f"max_delay={self.max_delay}{' closed' if self._closed else ''}>"
        )


_ONE_TENSOR = flatten(((torch.empty(0),), {}))[1]  # the spec of batcher(x)


def _notify_cancelled(fut: ForwardFuture[Any]) -> None:
    """A sample's future was cancelled: its row is dropped (see ``_on_cancel``)."""
    fut.set_running_or_notify_cancel()


def _signature(leaf: Any) -> Hashable:
    """What must match for two samples' leaves to share a batch."""
    if isinstance(leaf, torch.Tensor):  # (torch.Size is a tuple)
        return ("tensor", leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad)
    try:
        hash(leaf)
    except TypeError:
        return ("object", id(leaf))  # unhashable: batch only with the very same object
    return ("value", type(leaf), leaf)


def _deliver(
    futures: Sequence[_Sink],
    loop: asyncio.AbstractEventLoop | None,
    rows: Sequence[Any] | None = None,
    exc: BaseException | None = None,
    cancel: bool = False,
) -> None:
    """End each caller's future: with its row, ``exc``, or cancelled. A ForwardFuture is set
    here (any thread); the asyncio futures of one loop are set by one call in that loop.
    ``loop``: the loop of every future (the common batch: awaited on one loop, sorted by
    nobody), or None."""
    groups: list[tuple[asyncio.AbstractEventLoop, Sequence[Any], Sequence[Any] | None]] = []
    if loop is not None:
        groups.append((loop, futures, rows))
    else:
        by_loop: dict[asyncio.AbstractEventLoop, tuple[list[Any], list[Any]]] = {}
        for i, f in enumerate(futures):
            row = None if rows is None else rows[i]
            if isinstance(f, ForwardFuture):
                try:
                    _settle(f, row, exc, cancel)
                except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                    pass
            elif not f.done():  # a racy read, made good in _settle_in_loop
                fs, rs = by_loop.setdefault(f.get_loop(), ([], []))
                fs.append(f)
                rs.append(row)
        groups += [(lp, fs, None if rows is None else rs) for lp, (fs, rs) in by_loop.items()]
    for target, sinks, their_rows in groups:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody awaits there
            target.call_soon_threadsafe(_settle_in_loop, sinks, their_rows, exc, cancel)


def _settle_in_loop(
    futures: Sequence[asyncio.Future[Any]],
    rows: Sequence[Any] | None,
    exc: BaseException | None,
    cancel: bool,
) -> None:
    if rows is not None:  # the common case, once per row: no call of _settle
        for f, row in zip(futures, rows, strict=True):
            if not f.done():  # else its caller was cancelled or timed out
                f.set_result(row)
        return
    for f in futures:
        if not f.done():  # else its caller was cancelled or timed out
            _settle(f, None, exc, cancel)


def _settle(f: _Sink, row: Any, exc: BaseException | None, cancel: bool) -> None:
    """End one caller's future (an asyncio one in its loop's thread). A batch the pool
    cancelled (``shutdown(cancel_futures=True)``) cancels a ForwardFuture, and raises
    ``concurrent.futures.CancelledError`` in an asyncio caller, as awaiting a cancelled
    ForwardFuture does on every loop: ``asyncio.CancelledError`` would tell the caller's task
    that it was cancelled itself, and a task group would drop the failure silently."""
    if cancel and isinstance(f, ForwardFuture):
        f.cancel()
    elif cancel:
        f.set_exception(concurrent.futures.CancelledError())
    elif exc is not None:
        f.set_exception(exc)
    else:
        f.set_result(row)
