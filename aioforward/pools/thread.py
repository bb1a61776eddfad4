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

    submit() --SimpleQueue--> worker thread: module(*args) under inference_mode
       ^                                  |
       '-- ForwardFuture <-- set_result --'  (the awaiting loop is woken thread-safely)
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

import torch

from .._call import ModuleSpec
from .._cpus import usable_cpus
from ._base import Pool, _check_int, _WorkItem

__all__ = ["ThreadPool"]

_torch_threads_lock = threading.Lock()
_torch_threads_owners: list[tuple[Pool, int]] = []  # (pool, value to restore)


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
        grad: run with autograd enabled instead of ``torch.inference_mode()``.
        max_queued: waiting calls allowed before ``QueueFullError`` (default: no limit).
    """

    _kind = "thread"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        grad: bool = False,
        max_queued: int | None = None,
        name: str | None = None,
    ) -> None:
        cpus = usable_cpus()
        if workers is None:
            workers = cpus
        _check_int("workers", workers, 1)
        if threads_per_worker is None:
            threads_per_worker = max(1, cpus // workers)
        _check_int("threads_per_worker", threads_per_worker, 0)
        super().__init__(max_queued=max_queued, name=name)
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.grad = bool(grad)
        self._q: queue.SimpleQueue[_WorkItem | None] = queue.SimpleQueue()
        self._specs: dict[int, tuple[ModuleSpec, torch.nn.Module]] = {}
        self._spec_lock = threading.Lock()
        if threads_per_worker:
            _claim_torch_threads(self, threads_per_worker)
        self._threads = [
            threading.Thread(target=self._worker_main, name=f"{self._name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()
            self._add_slot(new_worker=True)

    def _dispatch(self, item: _WorkItem) -> None:
        self._q.put(item)

    def _shutdown_backend(self, wait: bool) -> None:
        for _ in self._threads:
            self._q.put(None)
        if wait:
            for t in self._threads:
                t.join()
        if self.threads_per_worker:
            _release_torch_threads(self)

    def _worker_main(self) -> None:
        if self.threads_per_worker:
            # OpenMP's thread count is a per-thread setting that new threads
            # inherit from the environment, not from the main thread's
            # torch.set_num_threads: set it here or every call oversubscribes.
            torch.set_num_threads(self.threads_per_worker)
        q = self._q
        while (item := q.get()) is not None:
            if item.future.done():  # cancelled or timed out between dispatch and start
                self._finish(item)
                continue
            c = item.call
            t0 = time.perf_counter()
            try:
                fn = c.module
                if isinstance(fn, ModuleSpec):
                    fn = self._build(fn)
                if isinstance(fn, torch.nn.Module):
                    out = self._forward(item, fn)
                else:
                    out = fn(*c.args, **c.kwargs)
            except BaseException as exc:
                item.compute_s = time.perf_counter() - t0
                self._finish(item, exc=exc)
                del exc
            else:
                item.compute_s = time.perf_counter() - t0
                self._finish(item, out)
            del item, c, fn

    def _forward(self, item: _WorkItem, module: torch.nn.Module) -> Any:
        """Run one forward pass in this worker thread (the CUDA pool adds streams)."""
        c = item.call
        with torch.enable_grad() if self.grad else torch.inference_mode():
            return module(*c.args, **c.kwargs)

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Where a module built from a ModuleSpec goes (here: where it was built)."""
        return module

    def _build(self, spec: ModuleSpec) -> torch.nn.Module:
        with self._spec_lock:
            hit = self._specs.get(id(spec))
            if hit is None or hit[0] is not spec:
                hit = (spec, self._place(spec.build()))
                self._specs[id(spec)] = hit
            return hit[1]

    async def _load(self, modules: tuple[torch.nn.Module | ModuleSpec, ...]) -> None:
        for m in modules:
            if isinstance(m, ModuleSpec):
                self._build(m)


def _claim_torch_threads(pool: Pool, n: int) -> None:
    with _torch_threads_lock:
        _torch_threads_owners.append((pool, torch.get_num_threads()))
        torch.set_num_threads(n)


def _release_torch_threads(pool: Pool) -> None:
    """Restore torch's thread count once the last pool that changed it closes."""
    with _torch_threads_lock:
        idx = next((i for i, (p, _) in enumerate(_torch_threads_owners) if p is pool), None)
        if idx is None:
            return
        _, previous = _torch_threads_owners.pop(idx)
        if not _torch_threads_owners:
            with contextlib.suppress(RuntimeError):
                torch.set_num_threads(previous)
        elif idx == 0:
            # keep the oldest saved value for whoever restores last
            p, _ = _torch_threads_owners[0]
            _torch_threads_owners[0] = (p, previous)
