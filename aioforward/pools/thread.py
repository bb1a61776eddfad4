"""ThreadPool: forward passes on persistent worker threads of this process.

torch releases the GIL inside its kernels, so compute-bound modules really run
at once on threads, with shared weights and no data transfer at all. The catch
is oversubscription: every concurrent call also uses torch's intra-op threads,
and N calls x the default thread count fight for the same cores (measured here:
two MLPs reach 1.9x at 1 thread per call, 1.0-1.3x at torch's default). So the
pool budgets torch's thread count, which is process-wide
(``torch.set_num_threads``), to ``usable CPUs // workers`` while it is open and
restores the previous value when it closes (``threads_per_worker=0`` leaves
torch alone).

Data flow::

    submit() --> the core reserves an idle worker --inbox--> its thread:
                 module(*args) under torch.no_grad()
       ^                                  |
       '-- ForwardFuture <-- call_done ---'  (the awaiting loop is woken thread-safely)

Each thread has its own inbox: the core hands a call only to a worker it
reserved, and a stop signal only to an idle one, so no call is ever stranded
behind a stop signal.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
import types
from typing import TYPE_CHECKING, Any

import torch

from .. import _cancel
from .._call import ModuleSpec
from .._cpus import usable_cpus
from .._stream import iter_of, not_a_call
from .._validate import check_bool, check_int, check_number
from ._base import Backend, Pool
from ._worker import Worker, WorkItem

if TYPE_CHECKING:
    from ._base import PoolCore

__all__ = ["ThreadPool"]

_torch_threads_lock = threading.Lock()
_torch_threads_owners: list[tuple[object, int]] = []  # (owner, value to restore)


class _ThreadWorker(Worker):
    """One persistent thread with its own inbox."""

    def __init__(self, core: PoolCore, backend: ThreadBackend, name: str) -> None:
        super().__init__()
        self._inbox: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=_thread_main, args=(core, backend, self, self._inbox), name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def run(self, item: WorkItem) -> None:
        self._inbox.put(item)

    def stop(self) -> None:
        self._inbox.put(None)

    def join(self, timeout: float | None) -> None:
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)


def _thread_main(
    core: PoolCore,
    backend: ThreadBackend,
    w: _ThreadWorker,
    inbox: queue.SimpleQueue[WorkItem | None],
) -> None:
    backend.thread_setup()
    core.worker_ready(w)
    local = _cancel.local  # where the cancellation checks find the running call
    clock = time.perf_counter
    execute = backend.execute
    call_done = core.call_done
    while (item := inbox.get()) is not None:
        if item.future.done():  # cancelled or timed out between reservation and start
            call_done(w, item)
            continue
        t0 = clock()
        local.item = item
        try:
            out = execute(item)
        except BaseException as exc:
            local.item = None
            item.compute_s = clock() - t0
            call_done(w, item, exc=exc)
            del exc
        else:
            local.item = None
            item.compute_s = clock() - t0
            call_done(w, item, out)
            del out  # the thread must not keep the last result alive until its next call
        del item
    core.worker_lost(w)


class ThreadBackend(Backend):
    """Runs calls in this process; shared by the ThreadPool's workers (and CUDA's)."""

    def __init__(
        self,
        name: str,
        threads_per_worker: int,
        grad: bool,
        cancel_checks: bool = True,
        cancel_grace: float = 1.0,
    ) -> None:
        self.name = name
        self.threads_per_worker = threads_per_worker
        self.grad = grad
        self.checks = _cancel.Checks() if cancel_checks else None
        self.cancel_grace = cancel_grace
        self._ids = itertools.count()
        self._specs: dict[int, tuple[ModuleSpec, torch.nn.Module]] = {}
        self._spec_lock = threading.Lock()
        self._owner = object()  # the key of our claim on torch's thread count
        self._restore: int | None = None  # the count to restore in the closing thread

    def new_worker(self, core: PoolCore) -> Worker:
        return _ThreadWorker(core, self, f"{self.name}-{next(self._ids)}")

    def claim(self) -> None:
        """Budget torch's threads from the pool's construction, in the constructing thread:
        claiming at the first submit would set the count in whichever thread submits first
        (a Batcher's flusher), leaving the main thread's OpenMP threads spinning at the
        default count beside the workers (it halved the Batcher's throughput here)."""
        if self.threads_per_worker:
            claim_torch_threads(self._owner, self.threads_per_worker)

    def close(self) -> None:
        with self._spec_lock:
            self._specs.clear()
        if self.checks is not None:
            self.checks.remove()
        self._restore = release_torch_threads(self._owner)  # however the pool was closed

    def release_caller(self) -> None:
        apply_torch_threads(self._restore)
        self._restore = None

    def thread_setup(self) -> None:
        if self.threads_per_worker:
            # OpenMP's thread count is a per-thread setting that new threads
            # inherit from the environment, not from the main thread's
            # torch.set_num_threads: set it here or every call oversubscribes.
            torch.set_num_threads(self.threads_per_worker)

    def execute(self, item: WorkItem) -> Any:
        c = item.call
        fn = c.module
        if isinstance(fn, ModuleSpec):
            fn = self.build(fn)
        module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if not isinstance(module, torch.nn.Module):
            module = None
        elif self.checks is not None:
            self.checks.install(module)
        if item.stream is not None:
            return self.stream_items(item, fn, module, c.args, c.kwargs)
        if isinstance(fn, torch.nn.Module):
            out = self.forward(item, fn)
            if isinstance(out, types.GeneratorType):
                out.close()
                raise TypeError(not_a_call(item.name))
            return out
        if module is not None:  # a method of a module (e.g. generate)
            with self.grad_mode():
                return fn(*c.args, **c.kwargs)
        return fn(*c.args, **c.kwargs)

    def grad_mode(self) -> contextlib.AbstractContextManager[Any]:
        return torch.enable_grad() if self.grad else torch.no_grad()

    def stream_items(
        self,
        item: WorkItem,
        fn: Any,
        module: torch.nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """Run a streaming call: push each item ``fn(...)`` yields into the channel, stop
        when the consumer leaves or the call is cancelled, and close the iterator."""
        channel = item.stream
        assert channel is not None
        mode = self.grad_mode if module is not None else contextlib.nullcontext
        with mode():
            it = iter_of(fn(*args, **kwargs), item.name)
        try:
            while not item.cancel_requested:
                with mode():
                    try:
                        value = next(it)
                    except StopIteration:
                        return
                if not channel.put(self.finish_item(value)):
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with mode():
                    close()  # the generator's finally runs here, in the worker

    def finish_item(self, value: Any) -> Any:
        """Make a yielded item safe to hand to the consumer (the CUDA pool synchronises)."""
        return value

    def forward(self, item: WorkItem, module: torch.nn.Module) -> Any:
        """One forward pass in a worker thread (the CUDA pool adds streams).

        ``no_grad`` rather than ``inference_mode``: results must behave like a direct
        call's, and inference tensors refuse in-place use outside inference mode."""
        c = item.call
        # torch.no_grad() as two calls: the context manager costs several Python calls per
        # forward pass, and grad mode is this thread's own setting
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.grad)
        try:
            return module(*c.args, **c.kwargs)
        finally:
            torch._C._set_grad_enabled(prev)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Where a module built from a ModuleSpec goes (here: where it was built)."""
        return module

    def build(self, spec: ModuleSpec) -> torch.nn.Module:
        with self._spec_lock:
            hit = self._specs.get(id(spec))
            if hit is None or hit[0] is not spec:
                hit = (spec, self.place(spec.build()))
                self._specs[id(spec)] = hit
            return hit[1]

    def load(self, modules: tuple[torch.nn.Module | ModuleSpec, ...]) -> None:
        for m in modules:
            if isinstance(m, ModuleSpec):
                self.build(m)


class ThreadPool(Pool):
    """Run forward passes on ``workers`` persistent threads.

    Threads cost the least per call (tens of microseconds) and share the
    module's weights; they parallelise compute-bound modules because torch
    releases the GIL in its kernels. Prefer :class:`ProcessPool` when a module
    spends much of its time in Python code that holds the GIL. For memory-bound
    modules (conv nets) call :func:`aioforward.keep_freed_memory` once: glibc's
    default of returning freed blocks to the kernel doubled their latency here.

    Example::

        async with aioforward.ThreadPool(workers=2) as pool:
            y1, y2 = await pool.run_parallel(m1, m2, x)

    Arguments:
        workers: threads, i.e. calls in flight (default: usable CPUs).
        threads_per_worker: torch intra-op threads per call; the pool sets
            torch's process-wide count to it while open (default: usable CPUs //
            workers, at least 1; ``0`` leaves torch's setting untouched).
        grad: run with autograd enabled instead of ``torch.no_grad()``.
        cancel_checks: make the stacks of the modules the pool runs
            (``nn.ModuleList``/``nn.Sequential``) check for cancellation before
            each member, so that a cancelled or timed-out call stops at its next
            block and frees its thread (default True; given back at close; see
            the README's cancellation section).
        cancel_grace: seconds a cancelled call has to stop before it counts in
            ``stats().overran`` (a thread cannot be killed: it keeps its slot
            until the call ends).
        max_queued: waiting calls allowed before ``QueueFullError`` (default: no limit).
        name: the prefix of the threads' names.
    """

    _kind = "thread"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        grad: bool = False,
        cancel_checks: bool = True,
        cancel_grace: float = 1.0,
        max_queued: int | None = None,
        name: str | None = None,
    ) -> None:
        cpus = usable_cpus()
        workers = cpus if workers is None else workers
        check_int("workers", workers, 1)
        check_int("threads_per_worker", threads_per_worker, 0, optional=True)
        if threads_per_worker is None:
            threads_per_worker = max(1, cpus // workers)
        check_bool("grad", grad)
        check_bool("cancel_checks", cancel_checks)
        check_number("cancel_grace", cancel_grace)
        self.threads_per_worker = threads_per_worker
        self.grad = grad
        self.cancel_checks = cancel_checks
        self.cancel_grace = float(cancel_grace)
        name = name or f"aioforward-{self._kind}"
        backend = self._backend(name)
        super().__init__(backend, workers=workers, max_queued=max_queued, name=name)
        backend.claim()

    def _backend(self, name: str) -> ThreadBackend:
        return ThreadBackend(
            name, self.threads_per_worker, self.grad, self.cancel_checks, self.cancel_grace
        )


def claim_torch_threads(owner: object, n: int) -> None:
    """Set torch's process-wide intra-op threads to ``n`` until ``owner`` releases it."""
    with _torch_threads_lock:
        _torch_threads_owners.append((owner, torch.get_num_threads()))
        torch.set_num_threads(n)


def release_torch_threads(owner: object) -> int | None:
    """Drop ``owner``'s claim; when it was the last, restore torch's thread count here and
    return it (OpenMP keeps the count per thread: the caller may have to apply it again in
    the thread that matters, see ``Backend.release_caller``)."""
    with _torch_threads_lock:
        idx = next((i for i, (p, _) in enumerate(_torch_threads_owners) if p is owner), None)
        if idx is None:
            return None
        _, previous = _torch_threads_owners.pop(idx)
        if not _torch_threads_owners:
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(previous)
            return previous
        if idx == 0:
            # keep the oldest saved value for whoever restores last
            p, _ = _torch_threads_owners[0]
            _torch_threads_owners[0] = (p, previous)
        return None


def apply_torch_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` in this thread, unless ``n`` is None or others claim it."""
    if n is None:
        return
    with _torch_threads_lock:
        if not _torch_threads_owners:
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(n)
