"""RayPool: the same API on a Ray cluster, one actor per worker.

Data flow::

    submit() ── module put once in Ray's object store (ObjectRef kept per module)
       │
       └─> the core reserves an idle actor:
             actor.forward.remote(key, [module_ref], args, kwargs) -> ObjectRef
             the actor fetches and keeps the module on its first call with that key,
             runs it without autograd, returns ("ok", out) or the encoded exception
       ForwardFuture <── ObjectRef.future() done-callback ── core.call_done ─┘

The module's ObjectRef travels inside a list, so Ray does not fetch and
unpickle the module on every call: the actor does it once per module. Ray is
an optional dependency (``pip install 'aioforward[ray]'``), imported when a
``RayPool`` is created. Capacity, FIFO queueing, timeouts, cancellation,
restarts and stats come from the pool's core: one call per actor at a time. A
dead actor fails only its own call (``WorkerCrashedError``) and is replaced;
``timeout=`` kills the overrunning actor and replaces it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .._call import Call, ModuleSpec
from .._validate import check_int, check_number
from ..errors import EncodedException, SerializationError, WorkerCrashedError, encode_exception
from ._base import Backend, Pool
from ._worker import Worker

if TYPE_CHECKING:
    import concurrent.futures

    from ._base import PoolCore
    from ._worker import WorkItem

__all__ = ["RayPool"]


class _Actor:
    """The Ray actor: keeps the modules it was sent and runs forward passes."""

    def __init__(self, threads: int) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.modules: dict[int, torch.nn.Module] = {}

    def pid(self) -> int:
        return os.getpid()

    def forward(
        self, key: int, box: list[Any] | None, args: Any, kwargs: Any
    ) -> tuple[str, Any, float] | EncodedException:
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
            with torch.no_grad():
                out = module(*args, **kwargs)
            return ("ok", out, time.perf_counter() - t0)
        except BaseException as exc:
            return encode_exception(exc)

    def forget(self, key: int) -> None:
        self.modules.pop(key, None)


class _RayWorker(Worker):
    """One actor."""

    def __init__(self, backend: _RayBackend, core: PoolCore) -> None:
        super().__init__()
        self._backend = backend
        self._core = core
        self.handle: Any = None
        self.modules: set[int] = set()  # keys this actor is known to hold

    def start(self) -> None:
        self.handle = self._backend.actor_cls.remote(self._backend.threads)
        self.handle.pid.remote().future().add_done_callback(self._started)

    def _started(self, f: concurrent.futures.Future[Any]) -> None:
        if f.cancelled() or f.exception() is not None:
            err = f.exception() if not f.cancelled() else None
            why = f"{type(err).__name__}: {err}" if err else "cancelled"
            from ..errors import WorkerStartError

            self._core.worker_lost(
                self, start_error=WorkerStartError(f"a Ray actor could not start: {why}")
            )
            return
        self.pid = f.result()
        self._core.worker_ready(self)

    def run(self, item: WorkItem) -> None:
        key, ref = item.payload
        c = item.call
        # Send the module's ObjectRef only until the actor holds it: a ref inside the
        # arguments makes the actor a borrower, which costs Ray messages on every call.
        box = None if key in self.modules else [ref]
        out = self.handle.forward.remote(key, box, c.args, c.kwargs)
        out.future().add_done_callback(lambda f: self._done(item, key, f))

    def _done(self, item: WorkItem, key: int, f: concurrent.futures.Future[Any]) -> None:
        ray = self._backend.ray
        try:
            msg = f.result()
        except ray.exceptions.RayActorError as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            err = WorkerCrashedError(
                f"Ray actor (pid {self.pid}) running {item.name} died: {why}",
                module=item.name,
                pid=self.pid or 0,
                exitcode=None,
            )
            self._core.worker_lost(self, item_error=err)
            return
        except BaseException as e:  # the call never ran: arguments Ray could not move
            exc = SerializationError(f"Ray could not run {item.name}: {e}")
            exc.__cause__ = e
            self._core.call_done(self, item, exc=exc)
            return
        if isinstance(msg, EncodedException):
            self._core.call_done(self, item, exc=msg.rebuild())
            return
        item.compute_s = msg[2]
        self.modules.add(key)
        self._core.call_done(self, item, msg[1])

    def interrupt(self, item: WorkItem) -> bool:
        # The deadline passed: kill the actor; _done reports it lost once Ray confirms.
        if self.item is item:
            self._backend.ray.kill(self.handle, no_restart=True)
            return True
        return False

    def stop(self) -> None:
        # Dropping the last handle makes Ray end the actor. (ray.kill() here could run in
        # one of Ray's own callback threads, where it deadlocks.)
        self.handle = None
        self._core.worker_lost(self)


class _RayBackend(Backend):
    def __init__(self, ray: Any, actor_cls: Any, threads: int, owns_ray: bool) -> None:
        self.ray = ray
        self.actor_cls = actor_cls
        self.threads = threads
        self.owns_ray = owns_ray
        self._lock = threading.Lock()
        self._refs: dict[int, tuple[Any, int, Any]] = {}  # id(module) -> (weakref, key, ref)
        self._keys = iter(range(1, 2**62))
        self._core: PoolCore | None = None

    def new_worker(self, core: PoolCore) -> Worker:
        self._core = core
        return _RayWorker(self, core)

    def prepare(self, c: Call) -> Any:
        module = c.module
        with self._lock:
            hit = self._refs.get(id(module))
            if hit is not None and hit[0]() is module:
                return hit[1], hit[2]
        try:
            ref = self.ray.put(module)
        except Exception as exc:
            raise SerializationError(
                f"{c.name} could not be put in Ray's object store: {type(exc).__name__}: "
                f"{exc}; build it inside the workers with aioforward.ModuleSpec(factory, ...)"
            ) from exc
        key = next(self._keys)
        with self._lock:
            self._refs[id(module)] = (weakref.ref(module), key, ref)
        return key, ref

    def reload(self, module: torch.nn.Module) -> None:
        with self._lock:
            hit = self._refs.pop(id(module), None)
        if hit is None or self._core is None:
            return
        for w in self._core.live_workers():
            assert isinstance(w, _RayWorker)
            if hit[1] in w.modules and w.handle is not None:
                w.modules.discard(hit[1])
                w.handle.forget.remote(hit[1])

    def close(self) -> None:
        with self._lock:
            self._refs.clear()

    def join(self, timeout: float | None) -> None:
        # Here, in the thread that closed the pool: close() may run in a Ray callback thread.
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()


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

    Ray is joined (or started) when the pool is constructed, so that an
    impossible placement fails at once; the actors start on first use.
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
        check_int("workers", workers, 1)
        check_number("num_cpus_per_worker", num_cpus_per_worker)
        check_number("num_gpus_per_worker", num_gpus_per_worker)
        if threads_per_worker is None:
            threads_per_worker = max(1, int(num_cpus_per_worker))
        check_int("threads_per_worker", threads_per_worker, 0)
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a str or None, got {address!r}")
        if init_kwargs is not None and not isinstance(init_kwargs, dict):
            raise TypeError(f"init_kwargs must be a dict or None, got {init_kwargs!r}")
        check_int("max_queued", max_queued, 0, optional=True)
        try:
            import ray
        except ImportError as exc:
            raise ImportError(
                "RayPool needs Ray: pip install 'aioforward[ray]' (or pip install ray)"
            ) from exc
        owns_ray = False
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            ray.init(address=address, **kwargs)
            owns_ray = True
        total = ray.cluster_resources()  # type: ignore[no-untyped-call]
        for res, each in (("CPU", num_cpus_per_worker), ("GPU", num_gpus_per_worker)):
            if each and total.get(res, 0) < workers * each:
                if owns_ray:
                    ray.shutdown()
                raise ValueError(
                    f"workers={workers} x num_{res.lower()}s_per_worker={each} needs "
                    f"{workers * each:g} {res}s but the Ray cluster has {total.get(res, 0):g}: "
                    "Ray would wait forever to place the actors"
                )
        actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(_Actor)
        backend = _RayBackend(ray, actor_cls, threads_per_worker, owns_ray)
        super().__init__(backend, workers=workers, max_queued=max_queued, name=name)
