"""ProcessPool: persistent torch worker processes, supervised one by one.

Data flow of one call::

    caller (any thread or loop)
      | submit(): pickle module ref + args now (an unpicklable input fails here,
      |           before a worker is reserved); large tensors are only recorded
      v
    Pool base: FIFO queue / free slot ------------------------------.
      | _dispatch(): pick an idle worker, copy the large tensors into |
      |              that worker's warm request segment (/dev/shm),   |
      |              send a small message on its pipe                 |
      v                                                               |
    worker process: map segment (zero-copy views), module(*args)     |
      |   under inference_mode; large outputs into its own warm      |
      |   response segment; small reply on the pipe                  |
      v                                                               |
    supervisor thread: multiprocessing.connection.wait() on every    |
      pipe and every process sentinel; copies outputs out, completes |
      the ForwardFuture (which wakes the awaiting loop), frees the   |
      slot ---------------------------------------------------------'
      | a sentinel fires: that worker died. Only its own call fails
      | (WorkerCrashedError naming module, pid, exit code or signal); its
      | segments are unlinked and a replacement is started.

Modules cross once per worker: parameters and buffers are copied once into a
shared segment that every worker maps (N workers, one copy); the first call of
a module on a worker carries the pickled structure. Workers are started with
the spawn context (fork after torch or threads have started deadlocks).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import torch

from ..._call import Call, ModuleSpec
from ..._cpus import usable_cpus
from ..._malloc import MALLOC_ENV
from ...errors import (
    RemoteError,
    RemoteTraceback,
    SerializationError,
    WorkerCrashedError,
    WorkerStartError,
)
from .._base import Pool, _check_int, _WorkItem
from ..thread import _claim_torch_threads, _release_torch_threads
from . import _transport as tr
from . import _worker as wk

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection

__all__ = ["ProcessPool"]

_pool_ids = itertools.count()
# Silent deaths while starting (no traceback reported) tolerated in a row before the waiting
# calls fail with WorkerStartError. Higher rides out more stray kills; lower fails faster when a
# worker crashes hard at every start (a segfaulting import). Back-off: 0.1 s, 0.2 s, 0.4 s...
START_RETRIES = 3
_environ_lock = threading.Lock()


class _Worker:
    __slots__ = (
        "calls",
        "conn",
        "item",
        "modules",
        "out_seg",
        "pid",
        "proc",
        "ready",
        "req_gen",
        "req_seg",
        "retiring",
        "start_error",
        "wid",
    )

    def __init__(self, wid: int, proc: Any, conn: Connection) -> None:
        self.wid = wid
        self.proc = proc
        self.conn = conn
        self.pid: int = proc.pid
        self.ready = False
        self.start_error = ""  # what the worker reported before dying while starting
        self.item: _WorkItem | None = None
        self.modules: set[Any] = set()  # module keys this worker holds
        self.req_seg: tr.Segment | None = None  # parent-owned request segment
        self.req_gen = 0
        self.out_seg: tr.Segment | None = None  # attached response segment
        self.calls = 0
        self.retiring = False


class ProcessPool(Pool):
    """Run forward passes in persistent, supervised torch worker processes.

    Use it when modules spend time in Python code that holds the GIL, to isolate
    faults, or to kill hung calls. Each worker runs one call at a time::

        async with aioforward.ProcessPool(workers=2, initializer=setup, initargs=(cfg,)) as pool:
            await pool.warmup(m1, m2, example=x)
            y1, y2 = await pool.run_parallel(m1, m2, x)

    It is a ``concurrent.futures.Executor`` too (``submit``, ``map``,
    ``shutdown``), so sync code and ``loop.run_in_executor`` can use it with
    picklable, importable functions.

    Arguments (each a trade-off):
        workers: processes, i.e. calls in flight (default: usable CPUs). More
            workers than cores only adds memory and contention.
        threads_per_worker: torch intra-op threads in each worker (default:
            usable CPUs // workers, at least 1): workers x threads <= cores
            avoids oversubscription, which made two calls slower than one here.
        interop_threads: torch inter-op threads per worker (default 1).
        initializer, initargs: called in each worker after torch is set up.
        seed: ``torch.manual_seed(seed)`` in every worker (default: not set).
        kill_on_cancel: kill and replace a worker whose call is cancelled
            (frees the slot at once; costs a worker start, about a second).
        max_calls_per_worker: recycle a worker after this many calls (bounds
            leaks in user code; each recycle costs a worker start).
        max_queued: waiting calls allowed before ``QueueFullError``.
        parent_threads: set the parent's torch intra-op threads while the pool
            is open (e.g. 1): a parent that keeps torch's default threads spins
            OpenMP threads after each op and took the two-module speed-up from
            1.9x to 1.3x here. Default: leave the parent alone.
        inline_bytes: tensors up to this size travel through the pipe, larger
            ones through shared memory (default 64 KiB). Large results are copied
            out by the supervisor thread: call :func:`aioforward.keep_freed_memory`
            so those copies reuse warm memory instead of fresh pages.
        shm_limit: most bytes of shared memory one transfer may use
            (default: what ``/dev/shm`` has free).
        start_timeout: seconds a worker may take to start before it is
            treated as failed (default 60).
    """

    _kind = "process"

    def __init__(
        self,
        workers: int | None = None,
        *,
        threads_per_worker: int | None = None,
        interop_threads: int = 1,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        seed: int | None = None,
        kill_on_cancel: bool = False,
        max_calls_per_worker: int | None = None,
        max_queued: int | None = None,
        parent_threads: int | None = None,
        inline_bytes: int = tr.INLINE_BYTES,
        shm_limit: int | None = None,
        start_timeout: float = 60.0,
        name: str | None = None,
    ) -> None:
        cpus = usable_cpus()
        workers = cpus if workers is None else workers
        _check_int("workers", workers, 1)
        threads_per_worker = (
            max(1, cpus // workers) if threads_per_worker is None else threads_per_worker
        )
        _check_int("threads_per_worker", threads_per_worker, 1)
        _check_int("interop_threads", interop_threads, 1)
        if max_calls_per_worker is not None:
            _check_int("max_calls_per_worker", max_calls_per_worker, 1)
        if parent_threads is not None:
            _check_int("parent_threads", parent_threads, 1)
        _check_int("inline_bytes", inline_bytes, 0)
        if shm_limit is not None:
            _check_int("shm_limit", shm_limit, 0)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        super().__init__(max_queued=max_queued, name=name)
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.interop_threads = interop_threads
        self.kill_on_cancel = kill_on_cancel
        self.max_calls_per_worker = max_calls_per_worker
        self.parent_threads = parent_threads
        self.inline_bytes = inline_bytes
        self.shm_limit = shm_limit
        self.start_timeout = start_timeout
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._seed = seed
        self._ctx = multiprocessing.get_context("spawn")
        self._prefix = f"{tr.PREFIX}{os.getpid()}_{next(_pool_ids)}_"
        self._wids = itertools.count()
        self._wlock = threading.RLock()
        self._procs: dict[int, _Worker] = {}  # wid -> worker (starting, idle or busy)
        self._idle_workers: list[_Worker] = []
        self._orphans: deque[_WorkItem] = deque()  # reserved a slot whose worker died meanwhile
        self._shipped: dict[int, tuple[weakref.ref[torch.nn.Module], int, tr.ShippedModule]] = {}
        self._versions = itertools.count()
        self._specs: dict[int, ModuleSpec] = {}
        self._drops: list[Any] = []  # module keys every worker should forget
        self._start_failures = 0  # consecutive deaths while starting; a READY resets it
        self._start_error: WorkerStartError | None = None  # set once waiting calls were failed
        self._next_start = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = False
        tr.sweep_stale()
        if parent_threads is not None:
            _claim_torch_threads(self, parent_threads)
        for _ in range(workers):
            self._spawn()
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"{self._name}-supervisor", daemon=True
        )
        self._supervisor.start()

    # ------------------------------------------------------------------ workers
    def _spawn(self) -> None:
        wid = next(self._wids)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=wk.worker_main,
            args=(
                child_conn,
                os.getpid(),
                f"{self._prefix}w{wid}_out",
                self.threads_per_worker,
                self.interop_threads,
                self._seed,
                self._initializer,
                self._initargs,
                self.inline_bytes,
            ),
            name=f"{self._name}-worker-{wid}",
            daemon=True,
        )
        env = {
            **MALLOC_ENV,  # glibc reads these at start: see aioforward._malloc
            "OMP_NUM_THREADS": str(self.threads_per_worker),
            "MKL_NUM_THREADS": str(self.threads_per_worker),
        }
        with _environ_lock:  # spawn copies os.environ: set thread/malloc variables for the child
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
        child_conn.close()
        w = _Worker(wid, proc, parent_conn)
        with self._wlock:
            self._procs[wid] = w
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _supervise(self) -> None:
        starting_since: dict[int, float] = {}
        while True:
            with self._wlock:
                if self._stopping and not self._procs:
                    return
                workers = list(self._procs.values())
            waitables: list[Any] = [self._wake_r]
            by_obj: dict[Any, tuple[str, _Worker]] = {}
            now = time.monotonic()
            for w in workers:
                waitables += [w.conn, w.proc.sentinel]
                by_obj[w.conn] = ("conn", w)
                by_obj[w.proc.sentinel] = ("dead", w)
                if not w.ready:
                    starting_since.setdefault(w.wid, now)
            timeout = 0.5 if any(not w.ready for w in workers) else None
            if self._next_start and not self._stopping:
                timeout = max(0.0, min(timeout or 1e9, self._next_start - now))
            ready = multiprocessing.connection.wait(waitables, timeout)
            for obj in ready:
                if obj == self._wake_r:
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(self._wake_r, 4096)
                    continue
                kind, w = by_obj[obj]
                if kind == "conn":
                    self._on_message(w)
            for obj in ready:
                if obj in by_obj and by_obj[obj][0] == "dead":
                    self._on_death(by_obj[obj][1])
                    starting_since.pop(by_obj[obj][1].wid, None)
            now = time.monotonic()
            for w in workers:
                if not w.ready and now - starting_since.get(w.wid, now) > self.start_timeout:
                    w.start_error = f"worker did not start within {self.start_timeout} s"
                    w.proc.kill()
            if self._next_start and now >= self._next_start and not self._stopping:
                self._next_start = 0.0
                with self._wlock:
                    missing = self.workers - len(self._procs)
                for _ in range(missing):
                    self._spawn()

    def _on_message(self, w: _Worker) -> None:
        try:
            raw = w.conn.recv_bytes()
        except (EOFError, OSError):
            return  # the sentinel reports the death
        msg = pickle.loads(raw)
        kind = msg[0]
        if kind == wk.READY:
            w.ready = True
            self._start_failures = 0
            self._start_error = None
            with self._wlock:
                if self._stopping:
                    self._stop_worker(w)
                    return
            self._worker_idle(w, new=True)
            return
        if kind == wk.START_FAILED:
            w.start_error = msg[1]
            return  # the process exits; _on_death handles it
        if kind == wk.OOM:
            w.retiring = True
            item = w.item
            if item is not None:
                item.payload = ("oom", msg[1])
            return
        item = w.item
        assert item is not None
        w.item = None
        w.calls += 1
        t_recv = time.perf_counter()
        result: Any = None
        exc: BaseException | None = None
        if kind == wk.OK:
            _, seg_name, table, payload, compute = msg
            item.compute_s = compute
            try:
                if seg_name is not None and (w.out_seg is None or w.out_seg.name != seg_name):
                    w.out_seg = tr.Segment.attach(seg_name)
                result = tr.loads(payload, w.out_seg, table, copy=True)
            except BaseException as e:
                exc = SerializationError(
                    f"the result of {item.call.name} could not be unpickled in the parent: "
                    f"{type(e).__name__}: {e}"
                )
                exc.__cause__ = e
        elif kind == wk.EXC:
            exc = _rebuild_exception(msg)
        elif kind == wk.SER_ERR:
            exc = SerializationError(
                f"the result of {item.call.name} could not be pickled in worker pid {w.pid}: "
                f"{msg[1]}"
            )
            exc.__cause__ = RemoteTraceback(msg[2])
        item.transfer_s += time.perf_counter() - t_recv  # send-side copy + receive-side unpickle
        self._finish(item, result, exc, release=False)
        if self.max_calls_per_worker is not None and w.calls >= self.max_calls_per_worker:
            w.retiring = True
            self._stop_worker(w)
            return
        self._worker_idle(w)

    def _worker_idle(self, w: _Worker, new: bool = False) -> None:
        with self._wlock:
            orphan = self._orphans.popleft() if self._orphans else None
            if orphan is not None:
                if new:
                    with self._lock:
                        self._workers += 1
                self._send(w, orphan)
                return
            self._idle_workers.append(w)
        self._add_slot(new_worker=new)

    def _on_death(self, w: _Worker) -> None:
        w.proc.join(1)
        code = w.proc.exitcode
        with self._wlock:
            self._procs.pop(w.wid, None)
            was_idle = w in self._idle_workers
            if was_idle:
                self._idle_workers.remove(w)
        with contextlib.suppress(OSError):
            w.conn.close()
        tr.unlink_prefix(f"{self._prefix}w{w.wid}_")
        if w.req_seg is not None:
            w.req_seg.unlink()
        if w.ready:
            if was_idle:
                self._lose_idle_slot()
            else:
                self._remove_slot()
        item, w.item = w.item, None
        if item is not None:
            self._finish(item, exc=self._crash_error(w, item, code), release=False)
        if self._stopping:
            self._poke()
            return
        if w.retiring and code in (0, wk.OOM_EXIT):
            self._restarts += 1
            self._spawn()
            return
        if not w.ready:  # it died while starting
            self._start_failures += 1
            err = WorkerStartError(
                f"a worker of {self._name} failed to start (exit code {code}):\n"
                f"{w.start_error or '(no traceback: it died before reporting)'}"
            )
            with self._wlock:
                any_ready = any(x.ready for x in self._procs.values())
            # A reported failure (the initializer or an import raised, or the start timed out)
            # will recur: fail the waiting calls now. A silent death (a stray SIGKILL, the OOM
            # killer) may not: only give up after it happens START_RETRIES times in a row.
            if not any_ready and (w.start_error or self._start_failures >= START_RETRIES):
                self._start_error = err
                self._fail_waiting(err)
            delay = min(5.0, 0.1 * 2 ** (self._start_failures - 1))
            self._next_start = time.monotonic() + delay  # back off: no respawn storm
            self._restarts += 1
            self._poke()
            return
        self._restarts += 1
        self._spawn()

    def _crash_error(self, w: _Worker, item: _WorkItem, code: int | None) -> BaseException:
        if isinstance(item.payload, tuple) and item.payload and item.payload[0] == "oom":
            how = "ran out of memory"
            hint = f" (hint: the worker ran out of memory)\n{item.payload[1]}"
        elif code is not None and code < 0:
            sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            how = f"was killed by signal {sig}"
            hint = " (SIGKILL: the kernel's OOM killer or a timeout)" if sig == "SIGKILL" else ""
        else:
            how, hint = f"exited with code {code}", ""
        return WorkerCrashedError(
            f"worker pid {w.pid} running {item.call.name} {how}{hint}",
            module=item.call.name,
            pid=w.pid,
            exitcode=code,
        )

    def _lose_idle_slot(self) -> None:
        with self._lock:
            self._workers -= 1
            if self._free > 0:
                self._free -= 1

    def _fail_waiting(self, err: BaseException) -> None:
        with self._lock:
            items = list(self._queue)
            self._queue.clear()
        with self._wlock:
            items += list(self._orphans)
            self._orphans.clear()
        for item in items:
            if item.started:
                self._finish(item, exc=err, release=False)
            else:
                with contextlib.suppress(Exception):
                    item.future.set_exception(err)

    def _stop_worker(self, w: _Worker) -> None:
        with contextlib.suppress(OSError):
            w.conn.send_bytes(pickle.dumps((wk.STOP,)))

    # ------------------------------------------------------------------ calls
    def _prepare(self, c: Call) -> Any:
        fn = c.module
        if isinstance(fn, torch.nn.Module):
            key = self._ship(fn)
            ref: tuple[Any, ...] = ("m", key)
        elif isinstance(fn, ModuleSpec):
            key = ("spec", id(fn))
            with self._wlock:
                self._specs[id(fn)] = fn  # keep it alive so its id is never reused
            ref = ("spec", key, fn)
        else:
            key = None
            ref = ("fn", fn)
        box = tr.Outbox(self.inline_bytes)
        try:
            body = box.dumps((ref, c.args, c.kwargs))
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {c.name} cannot be sent to a worker process: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        need = box.big_bytes()
        if need:
            tr.check_room(need, self.shm_limit)
        return (key, body, box)

    def _ship(self, module: torch.nn.Module) -> Any:
        with self._wlock:
            hit = self._shipped.get(id(module))
            if hit is not None and hit[0]() is module:
                return (id(module), hit[1])
        version = next(self._versions)
        try:
            shipped = tr.ship_module(module, f"{self._prefix}m{version}", self.shm_limit)
        except SerializationError:  # shared memory is short: the message already says so
            raise
        except Exception as exc:
            where = tr.find_unpicklable(module)
            what = f"attribute {where}" if where else "it"
            raise SerializationError(
                f"cannot send module {type(module).__name__} to a worker process: {what} cannot "
                f"be pickled ({type(exc).__name__}: {exc}). Build the module inside each worker "
                "instead: aioforward.ModuleSpec(factory, *args), with factory an importable "
                "function that returns the module"
            ) from exc
        mid = id(module)

        def forget(_ref: Any, mid: int = mid, version: int = version) -> None:
            with self._wlock:
                cur = self._shipped.get(mid)
                if cur is not None and cur[1] == version:
                    del self._shipped[mid]
                    self._drops.append((mid, version))
            shipped.release()

        with self._wlock:
            old = self._shipped.get(mid)
            self._shipped[mid] = (weakref.ref(module, forget), version, shipped)
        if old is not None:
            old[2].release()
        return (mid, version)

    def reload(self, module: torch.nn.Module) -> None:
        """Ship ``module`` again (after its weights or structure changed in this process).

        Workers use the copy they received until told otherwise; after
        ``reload`` the next call on each worker carries the new version::

            model.load_state_dict(new_weights)
            pool.reload(model)
        """
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        with self._wlock:
            old = self._shipped.pop(id(module), None)
            if old is not None:
                self._drops.append((id(module), old[1]))
        if old is not None:
            old[2].release()
        self._ship(module)

    def _dispatch(self, item: _WorkItem) -> None:
        with self._wlock:
            w = self._idle_workers.pop() if self._idle_workers else None
            if w is None:  # its worker died between reservation and dispatch
                self._orphans.append(item)
                return
            self._send(w, item)

    def _send(self, w: _Worker, item: _WorkItem) -> None:
        """Copy inputs into w's request segment and send the call (under _wlock)."""
        key, body, box = item.payload
        t0 = time.perf_counter()
        try:
            need = box.big_bytes()
            table: list[Any] = []
            seg_name = None
            if need:
                w.req_seg, w.req_gen = tr.ensure_segment(
                    w.req_seg, f"{self._prefix}w{w.wid}_in", w.req_gen, need
                )
                table = box.write(w.req_seg)
                seg_name = w.req_seg.name
            shipped = None
            if isinstance(key, tuple) and key and key[0] != "spec" and key not in w.modules:
                entry = self._shipped.get(key[0])
                if entry is None or entry[1] != key[1]:
                    raise RuntimeError(f"{item.call.name} was released before it could run")
                sm = entry[2]
                shipped = (key, sm.blob, sm.seg.name if sm.seg is not None else None)
            drops = [d for d in self._drops if d in w.modules]
            msg = pickle.dumps((wk.CALL, seg_name, table, drops, shipped, body), protocol=5)
        except BaseException:
            self._idle_workers.append(w)
            raise
        w.modules.difference_update(drops)
        if shipped is not None:
            w.modules.add(key)
        w.item = item
        item.worker = w
        item.payload = None  # drop references to the inputs once they are copied
        item.transfer_s = time.perf_counter() - t0
        try:
            w.conn.send_bytes(msg)
        except OSError:
            pass  # the worker is dying; its sentinel fails the call

    def _interrupt(self, item: _WorkItem) -> None:
        w = item.worker
        if w is not None and w.item is item:
            with contextlib.suppress(OSError):
                w.proc.kill()

    def _interrupt_on_cancel(self, item: _WorkItem) -> None:
        if self.kill_on_cancel:
            self._interrupt(item)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until all ``workers`` have started (raises ``WorkerStartError`` if they fail).

        Example: ``await pool.wait_ready(timeout=30)``.
        """
        with anyio.fail_after(timeout):
            while self.stats().workers < self.workers:
                if self._start_error is not None:
                    raise self._start_error
                await anyio.sleep(0.01)

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes. Example: ``os.kill(pool.worker_pids()[0], 9)``."""
        with self._wlock:
            return [w.pid for w in self._procs.values()]

    # ------------------------------------------------------------------ shutdown
    def _shutdown_backend(self, wait: bool) -> None:
        with self._wlock:
            self._stopping = True
            workers = list(self._procs.values())
        for w in workers:
            self._stop_worker(w)
        self._poke()
        deadline = time.monotonic() + 5
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1)
        self._poke()
        self._supervisor.join(10)
        for w in workers:
            with contextlib.suppress(OSError):
                w.conn.close()
            if not w.proc.is_alive():
                w.proc.close()
        with self._wlock:
            shipped = [e[2] for e in self._shipped.values()]
            self._shipped.clear()
        for s in shipped:
            s.release()
        tr.unlink_prefix(self._prefix)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.parent_threads is not None:
            _release_torch_threads(self)


def _rebuild_exception(msg: tuple[Any, ...]) -> BaseException:
    _, blob, type_name, text, tb = msg
    cause = RemoteTraceback(tb)
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except BaseException:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = cause
            return exc
    err = RemoteError(type_name, text, tb)
    err.__cause__ = cause
    return err
