"""RayPool: the same API on a Ray cluster, one actor per worker.

Data flow::

    submit() ── module put once in Ray's object store (ObjectRef kept per module)
       │
       └─> idle actor: actor.forward.remote(key, [module_ref], args, kwargs) -> ObjectRef
             the actor fetches and keeps the module on its first call with that key,
             runs it under inference_mode, returns ("ok", out) or the exception
       ForwardFuture <── ObjectRef.future() done-callback ─┘

The module's ObjectRef travels inside a list, so Ray does not fetch and
unpickle the module on every call: the actor does it once per module. Ray is
an optional dependency (``pip install 'aioforward[ray]'``), imported when a
``RayPool`` is created. Capacity, FIFO queueing, timeouts, cancellation and
stats come from the base :class:`~aioforward.Pool`: one call per actor at a time.
A dead actor fails only its own call (``WorkerCrashedError``) and is replaced;
``timeout=`` kills the overrunning actor and replaces it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import anyio
import torch

from .._call import Call, ModuleSpec
from ..errors import PoolClosedError, SerializationError, WorkerCrashedError
from ._base import Pool, _check_int, _check_number
from .process._pool import _rebuild_exception
from .process._worker import _exception_message

if TYPE_CHECKING:
    import concurrent.futures

    from ._base import _WorkItem

__all__ = ["RayPool"]


class _Actor:
    """The Ray actor: keeps the modules it was sent and runs forward passes."""

    def __init__(self, threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.modules: dict[int, torch.nn.Module] = {}

    def pid(self) -> int:
        return os.getpid()

    def forward(self, key: int, box: list[Any] | None, args: Any, kwargs: Any) -> tuple[Any, ...]:
        try:
            module = self.modules.get(key)
            if module is None:
                import ray

                if box is None:  # cannot happen unless the parent's bookkeeping is wrong
                    raise RuntimeError(f"actor pid {os.getpid()} lost module {key}")
                obj = ray.get(box[0])
                module = obj.build() if isinstance(obj, ModuleSpec) else obj
                self.modules[key] = module
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = module(*args, **kwargs)
            return ("ok", out, time.perf_counter() - t0)
        except BaseException as exc:
            return _exception_message(exc)

    def forget(self, key: int) -> None:
        self.modules.pop(key, None)


class _Worker:
    __slots__ = ("handle", "modules", "pid")

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.pid: int | None = None
        self.modules: set[int] = set()  # keys this actor is known to hold


class RayPool(Pool):
    """Run forward passes on Ray actors: the aioforward API across a cluster.

    Example::

        async with aioforward.RayPool(workers=4, num_cpus_per_worker=1) as pool:
            ya, yb = await pool.run_parallel(encoder_a, encoder_b, x)

    Arguments:
        workers: actors, i.e. calls in flight.
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``);
            by default an already initialised Ray, else a local one started
            here (and shut down when the pool closes).
        num_cpus_per_worker, num_gpus_per_worker: the resources each actor
            reserves. Ray waits silently forever for actors it cannot place, so
            the pool refuses up front when the cluster has fewer CPUs or GPUs in
            total than ``workers`` x these.
        threads_per_worker: torch intra-op threads in each actor (default: the
            actor's CPUs; 0 leaves torch alone).
        max_queued: waiting calls allowed before ``QueueFullError``.
        init_kwargs: passed to ``ray.init`` when the pool starts Ray.

    Modules are put in Ray's object store once (on their first call) and kept
    by each actor after its first call with them; :meth:`reload` ships a
    changed module again. Exceptions keep their type with the actor's
    traceback as ``__cause__``; a dead actor gives ``WorkerCrashedError``.
    """

    _kind = "ray"

    def __init__(
        self,
        workers: int = 2,
        *,
        address: str | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        threads_per_worker: int | None = None,
        max_queued: int | None = None,
        name: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_int("workers", workers, 1)
        _check_number("num_cpus_per_worker", num_cpus_per_worker)
        _check_number("num_gpus_per_worker", num_gpus_per_worker)
        if threads_per_worker is None:
            threads_per_worker = max(1, int(num_cpus_per_worker))
        _check_int("threads_per_worker", threads_per_worker, 0)
        try:
            import ray
        except ImportError as exc:
            raise ImportError(
                "RayPool needs Ray: pip install 'aioforward[ray]' (or pip install ray)"
            ) from exc
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            ray.init(address=address, **kwargs)
            self._owns_ray = True
        total = ray.cluster_resources()  # type: ignore[no-untyped-call]
        for res, each in (("CPU", num_cpus_per_worker), ("GPU", num_gpus_per_worker)):
            if each and total.get(res, 0) < workers * each:
                if self._owns_ray:
                    ray.shutdown()
                raise ValueError(
                    f"workers={workers} x num_{res.lower()}s_per_worker={each} needs "
                    f"{workers * each:g} {res}s but the Ray cluster has {total.get(res, 0):g}: "
                    "Ray would wait forever to place the actors"
                )
        super().__init__(max_queued=max_queued, name=name)
        self.workers = workers
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(
            _Actor
        )
        self._threads = threads_per_worker
        self._alock = threading.Lock()
        self._idle_actors: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._refs: dict[int, tuple[Any, int, Any]] = {}  # id(module) -> (weakref, key, ref)
        self._keys = iter(range(1, 2**62))
        for _ in range(workers):
            self._idle_actors.append(self._start_actor())
            self._add_slot(new_worker=True)

    def _start_actor(self) -> _Worker:
        w = _Worker(self._actor_cls.remote(self._threads))
        self._live.add(w)

        def got_pid(f: concurrent.futures.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None:
                w.pid = f.result()

        w.handle.pid.remote().future().add_done_callback(got_pid)
        return w

    # ------------------------------------------------------------------ hooks
    def _prepare(self, c: Call) -> Any:
        module = c.module
        with self._alock:
            hit = self._refs.get(id(module))
            if hit is not None and hit[0]() is module:
                return hit[1], hit[2]
        try:
            ref = self._ray.put(module)
        except Exception as exc:
            raise SerializationError(
                f"{c.name} could not be put in Ray's object store: {type(exc).__name__}: "
                f"{exc}; build it inside the workers with aioforward.ModuleSpec(factory, ...)"
            ) from exc
        key = next(self._keys)
        with self._alock:
            self._refs[id(module)] = (weakref.ref(module), key, ref)
        return key, ref

    def _dispatch(self, item: _WorkItem) -> None:
        with self._alock:
            if not self._idle_actors:  # only while closing: the dead actor was not replaced
                raise PoolClosedError(f"{self._name} closed before the call ran")
            w = self._idle_actors.pop()
        item.worker = w
        key, ref = item.payload
        c = item.call
        # Send the module's ObjectRef only until the actor holds it: a ref inside the
        # arguments makes the actor a borrower, which costs Ray messages on every call.
        box = None if key in w.modules else [ref]
        out = w.handle.forward.remote(key, box, c.args, c.kwargs)
        out.future().add_done_callback(lambda f: self._on_done(item, w, f))

    def _on_done(self, item: _WorkItem, w: _Worker, f: concurrent.futures.Future[Any]) -> None:
        exc: BaseException | None = None
        result: Any = None
        try:
            msg = f.result()
        except self._ray.exceptions.RayActorError as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            exc = WorkerCrashedError(
                f"Ray actor (pid {w.pid}) running {item.call.name} died: {why}",
                module=item.call.name,
                pid=w.pid or 0,
                exitcode=None,
            )
            with self._alock:
                self._live.discard(w)
                if not self.closed:
                    w = self._start_actor()  # the replacement takes the slot
            with self._lock:
                self._restarts += 1
        except BaseException as e:  # the call never ran: arguments Ray could not move
            exc = SerializationError(f"Ray could not run {item.call.name}: {e}")
            exc.__cause__ = e
        else:
            if msg[0] == "ok":
                result, item.compute_s = msg[1], msg[2]
                w.modules.add(item.payload[0])
            else:
                exc = _rebuild_exception(msg)
        with self._alock:
            if w in self._live:
                self._idle_actors.append(w)
        self._finish(item, result, exc)

    def _interrupt(self, item: _WorkItem) -> None:
        # The deadline passed: kill the actor; _on_done replaces it once Ray confirms.
        self._ray.kill(item.worker.handle, no_restart=True)

    def reload(self, module: torch.nn.Module) -> None:
        """Ship ``module`` again on its next call (after changing its weights in place).

        Example: ``model.load_state_dict(new); pool.reload(model)``.
        """
        with self._alock:
            hit = self._refs.pop(id(module), None)
        if hit is not None:
            with self._alock:
                actors = list(self._live)
            for w in actors:
                w.modules.discard(hit[1])
                w.handle.forget.remote(hit[1])

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every actor is up (Ray places and starts them lazily).

        Example: ``await pool.wait_ready(timeout=60)``.
        """
        with anyio.fail_after(timeout):
            while len(self.worker_pids()) < self.workers:
                await anyio.sleep(0.02)

    def worker_pids(self) -> list[int]:
        """Pids of the actors' processes (those known so far). Example: ``pool.worker_pids()``."""
        with self._alock:
            return [w.pid for w in self._live if w.pid is not None]

    def _shutdown_backend(self, wait: bool) -> None:
        with self._alock:
            actors, self._idle_actors = list(self._live), []
            self._live.clear()
            self._refs.clear()
        for w in actors:
            self._ray.kill(w.handle, no_restart=True)
        if self._owns_ray:
            self._ray.shutdown()
