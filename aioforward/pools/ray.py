"""RayPool: the same API on a Ray cluster, one actor per worker.

Data flow::

    submit() ── module put once in Ray's object store (ObjectRef kept per module)
       │        arguments packed: large CPU tensors taken out as numpy views (_pack)
       │
       └─> the core reserves an idle actor:
             actor.forward.remote(key, [module_ref], packed (args, kwargs)) -> ObjectRef
             the actor fetches and keeps the module on its first call with that key,
             unpacks the arguments (tensors viewing the object store, no copy),
             runs it without autograd, returns ("ok", packed_out) or the encoded exception
       ForwardFuture <── unpack ── ObjectRef.future() done-callback ── core.call_done ─┘

The module's ObjectRef travels inside a list, so Ray does not fetch and
unpickle the module on every call: the actor does it once per module. Ray is
an optional dependency (``pip install 'aioforward[ray]'``), imported when a
``RayPool`` is created. Capacity, FIFO queueing, timeouts, cancellation,
restarts and stats come from the pool's core: one call per actor at a time.

Tensors: Ray pickles a ``torch.Tensor`` in band, so it is copied on every hop
(ray-project/ray#12317), while numpy arrays travel out of band: one copy into
the object store, none out of it. ``_pack`` pickles a call's arguments (and
the actor its result) with every large CPU tensor replaced by a reference to a
numpy view of its storage; Ray moves the views, ``_unpack`` rebuilds tensors
over the received memory. Received tensors are writable and belong to the
receiver alone (the object they view is referenced by nobody else); they hold
object-store memory while they live.

Failures: a dead actor (its process killed, its whole node gone) fails only
its own call with ``WorkerCrashedError`` naming the actor's pid and node, and
is replaced at once wherever Ray can place it; ``timeout=`` kills the
overrunning actor and replaces it. Ray waits forever for an actor it cannot
place, so an actor not started within ``start_timeout`` is given up: it is
killed, reported to the core as a start failure (waiting calls fail with
``WorkerStartError`` when no other actor is up) and retried with back-off, so
a node added later is used.
"""

from __future__ import annotations

import io
import os
import pickle
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .._call import Call, ModuleSpec, method_owner
from .._stream import iter_of
from .._validate import check_int, check_number
from ..errors import (
    EncodedException,
    SerializationError,
    WorkerCrashedError,
    WorkerStartError,
    encode_exception,
)
from ._base import Backend, Pool
from ._worker import Worker

if TYPE_CHECKING:
    import concurrent.futures

    import numpy as np  # at run time only where Ray is, which requires it

    from ._base import PoolCore
    from ._worker import WorkItem

__all__ = ["RayPool"]

# Tensors of at least this many bytes cross as numpy views (out of band, no copy out of the
# object store); smaller ones are pickled with the rest of the call. Ray inlines objects under
# 100 KiB in the task itself, where a view gains nothing; lower adds a Ray buffer per small
# tensor, higher copies more bytes.
ZERO_COPY_BYTES = 256 * 1024


class _Packed(NamedTuple):
    """A structure pickled with its large tensors taken out (see :func:`_pack`)."""

    blob: bytes  # the structure; tensor i is persistent id (i, dtype, shape)
    arrays: list[np.ndarray[Any, Any]]  # uint8 views of the tensors' storage


def _viewable(t: torch.Tensor) -> bool:
    return (
        t.device.type == "cpu"
        and t.layout is torch.strided
        and not t.requires_grad
        and t.nbytes >= ZERO_COPY_BYTES
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
        and not t.is_quantized
    )


_pickler: Any = None  # cloudpickle's Pickler taking large tensors out; built on first use


_SCALARS = (int, float, complex, str, bytes, bool, type(None))


def _plain(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` surely holds no tensor to take out: a cheap look through plain
    containers (a few levels deep); any other object may hide one, so it is packed."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes < ZERO_COPY_BYTES or not _viewable(obj)
    if isinstance(obj, _SCALARS):
        return True
    if depth < 4 and type(obj) in (tuple, list):
        return all(_plain(o, depth + 1) for o in obj)
    if depth < 4 and type(obj) is dict:
        return all(_plain(o, depth + 1) for o in obj.values())
    return False


def _pack(obj: Any) -> Any:
    """Pickle ``obj`` (with cloudpickle, as Ray would) taking large CPU tensors out as views;
    ``obj`` itself when it surely holds none (Ray pickles it once, as usual).

    Example: ``_unpack(_pack((torch.ones(1 << 20),)))`` gives an equal tuple back.
    """
    global _pickler
    if _plain(obj):
        return obj
    if _pickler is None:
        from ray import cloudpickle

        class _Pickler(cloudpickle.CloudPickler):
            arrays: list[np.ndarray[Any, Any]]
            # a tensor met again arrives as the same tensor; each is kept alive (as pickle's
            # memo does), or a temporary's id could come back for another
            seen: dict[int, tuple[Any, torch.Tensor]]

            def persistent_id(self, o: Any) -> Any:
                if type(o) is torch.Tensor and _viewable(o):
                    hit = self.seen.get(id(o))
                    if hit is not None:
                        return hit[0]
                    self.arrays.append(o.reshape(-1).view(torch.uint8).numpy())
                    pid = (len(self.arrays) - 1, o.dtype, tuple(o.shape))
                    self.seen[id(o)] = (pid, o)
                    return pid
                return None

        _pickler = _Pickler
    buf = io.BytesIO()
    p = _pickler(buf, protocol=5)
    p.arrays = []
    p.seen = {}
    p.dump(obj)
    return _Packed(buf.getvalue(), p.arrays)


class _Writable:
    """Exposes a read-only array's memory as writable (numpy keeps this holder, and through
    it the received buffer, alive). The object store gives each receiver its own object:
    writing changes nobody else's data, and torch would warn on a read-only array."""

    def __init__(self, a: np.ndarray[Any, Any]) -> None:
        self.a = a
        self.__array_interface__ = {**a.__array_interface__, "data": (a.ctypes.data, False)}


class _Unpickler(pickle.Unpickler):
    def __init__(self, p: _Packed) -> None:
        super().__init__(io.BytesIO(p.blob))
        self.arrays = p.arrays
        self.tensors: dict[int, torch.Tensor] = {}  # array index -> its tensor

    def persistent_load(self, pid: Any) -> Any:
        i, dtype, shape = pid
        t = self.tensors.get(i)
        if t is None:
            a = self.arrays[i]
            if not a.flags.writeable:
                import numpy as np  # Ray requires numpy: it is there whenever this runs

                a = np.asarray(_Writable(a))
            t = self.tensors[i] = torch.from_numpy(a).view(dtype).reshape(shape)
        return t


def _unpack(p: Any) -> Any:
    """Rebuild what :func:`_pack` packed; tensors view the received arrays (no copy)."""
    return _Unpickler(p).load() if isinstance(p, _Packed) else p


class _Actor:
    """The Ray actor: keeps the modules it was sent and runs forward passes."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.modules: dict[int, torch.nn.Module] = {}
        self.unwatched = threading.Event()
        self.stop_seq = -1  # the seq of a stream to stop (set by stop_stream)

    def stop_stream(self, seq: int) -> None:
        """Runs in the control group while a stream runs: its loop stops at the next item."""
        self.stop_seq = seq

    def _resolve(self, key: int, box: list[Any] | None, method: str | None) -> Any:
        module = self.modules.get(key)
        if module is None:
            import ray

            if box is None:  # cannot happen unless the parent's bookkeeping is wrong
                raise RuntimeError(f"actor pid {os.getpid()} lost module {key}")
            obj = ray.get(box[0])
            module = obj.build() if isinstance(obj, ModuleSpec) else obj
            self.modules[key] = module
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # in the thread Ray runs calls in
        return getattr(module, method) if method else module

    def stream(
        self, seq: int, key: int, box: list[Any] | None, method: str | None, call: Any
    ) -> Any:
        """A Ray streaming generator: each item the call yields, packed like a result; an
        exception as a last, encoded item."""
        try:
            fn = self._resolve(key, box, method)
            args, kwargs = _unpack(call)
            with torch.no_grad():
                it = iter_of(
                    fn(*args, **kwargs),
                    getattr(fn, "__qualname__", type(fn).__name__),
                )
            try:
                while self.stop_seq != seq:
                    with torch.no_grad():
                        try:
                            value = next(it)
                        except StopIteration:
                            return
                    yield ("item", _pack(value))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:
            yield encode_exception(exc)

    def watch(self) -> None:
        """Runs (in its own concurrency group) until :meth:`unwatch`: when the actor dies,
        idle or busy, its node with it, this call fails and the pool knows at once."""
        self.unwatched.wait()

    def unwatch(self) -> None:
        """Let :meth:`watch` return: Ray ends an unreferenced actor only once it is idle."""
        self.unwatched.set()

    def where(self) -> tuple[int, str]:
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def forward(
        self, key: int, box: list[Any] | None, call: Any, method: str | None = None
    ) -> tuple[str, Any, float] | EncodedException:
        try:
            module = self._resolve(key, box, method)
            a, kw = _unpack(call)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = module(*a, **kw)
            dt = time.perf_counter() - t0
            return ("ok", _pack(out), dt)
        except BaseException as exc:
            return encode_exception(exc)

    def forget(self, key: int) -> None:
        self.modules.pop(key, None)


def _why(e: BaseException) -> str:
    """The informative line of a Ray actor error (the first one is always the same)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("The actor died because"):
            return ln
    return lines[0] if lines else type(e).__name__


class _RayWorker(Worker):
    """One actor."""

    interruptible = True

    def __init__(self, backend: _RayBackend, core: PoolCore) -> None:
        super().__init__()
        self._backend = backend
        self._core = core
        self.handle: Any = None
        self.node: str | None = None  # the Ray node id, once started
        self.modules: set[int] = set()  # keys this actor is known to hold
        self._settled = threading.Lock()  # one of started / given up
        self._started_or_lost = False

    def start(self) -> None:
        b = self._backend
        self.handle = b.actor_cls.options(**b.options).remote(b.threads)
        self.handle.where.remote().future().add_done_callback(self._started)
        # Ray waits forever for an actor it cannot place: give up after start_timeout.
        self._core._timer.call_at(time.monotonic() + b.start_timeout, self._start_overdue)

    def _settle(self) -> bool:
        """Whether this caller is the first to settle the start (started or given up)."""
        with self._settled:
            first, self._started_or_lost = not self._started_or_lost, True
            return first

    def _started(self, f: concurrent.futures.Future[Any]) -> None:
        if not self._settle():
            return
        err = None if f.cancelled() else f.exception()
        if f.cancelled() or err is not None:
            why = _why(err) if err is not None else "cancelled"
            ray = self._backend.ray
            # An error in the actor's __init__ will recur; a node lost while the actor
            # started is a silent death, retried first.
            reported = not (
                isinstance(err, ray.exceptions.RayActorError) and not err.actor_init_failed
            )
            self._core.worker_lost(
                self,
                start_error=WorkerStartError(f"a Ray actor could not start: {why}"),
                reported=reported,
            )
            return
        self.pid, self.node = f.result()
        handle = self.handle  # None once stopped meanwhile; worker_ready then ignores it
        if handle is not None:
            watch = handle.watch.options(concurrency_group="watch").remote()
            watch.future().add_done_callback(self._watch_ended)
        self._core.worker_ready(self)

    def _watch_ended(self, f: concurrent.futures.Future[Any]) -> None:
        err = None if f.cancelled() else f.exception()
        if isinstance(err, self._backend.ray.exceptions.RayActorError):
            item = self.item  # the core's: at worst a call that just ended (its error is unused)
            self._core.worker_lost(self, item_error=self._crash(err, item))
        # else: unwatched by stop(), the normal end

    def _crash(self, e: BaseException, item: WorkItem | None) -> WorkerCrashedError:
        doing = f"running {item.name}" if item is not None else "while idle"
        return WorkerCrashedError(
            f"Ray actor (pid {self.pid} on node {self.node}) {doing} died: {_why(e)}",
            module=item.name if item is not None else "",
            pid=self.pid or 0,
            exitcode=None,
        )

    def _start_overdue(self) -> None:
        """The timer's thread (never one of Ray's, where ray.kill can deadlock)."""
        if not self._settle():
            return
        b = self._backend
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                b.ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass
        self._core.worker_lost(
            self,
            start_error=WorkerStartError(
                f"a Ray actor ({b.describe()}) was not placed and started within "
                f"start_timeout={b.start_timeout:g} s; {b.room()}. Waiting calls fail while "
                "no actor is up; the pool keeps retrying, so a node added later is used"
            ),
        )

    def run(self, item: WorkItem) -> None:
        key, ref, call, method = item.payload
        # Send the module's ObjectRef only until the actor holds it: a ref inside the
        # arguments makes the actor a borrower, which costs Ray messages on every call.
        box = None if key in self.modules else [ref]
        if item.stream is not None:
            gen = self.handle.stream.options(
                num_returns="streaming", _generator_backpressure_num_objects=item.stream.buffer
            ).remote(item.seq, key, box, method, call)
            threading.Thread(
                target=self._pump, args=(item, key, gen), name=f"{item.name}-stream", daemon=True
            ).start()
            return
        out = self.handle.forward.remote(key, box, call, method)
        out.future().add_done_callback(lambda f: self._done(item, key, f))

    def _pump(self, item: WorkItem, key: int, gen: Any) -> None:
        """Move a Ray streaming generator's items into the stream's channel (its own thread:
        a blocking put is the back-pressure)."""
        ray = self._backend.ray
        channel = item.stream
        assert channel is not None
        try:
            for ref in gen:
                msg = ray.get(ref)
                if isinstance(msg, EncodedException):
                    self._core.call_done(self, item, exc=msg.rebuild())
                    return
                if not channel.put(_unpack(msg[1])):
                    break  # the consumer left: stop the actor's loop, wait for its end
            else:
                self.modules.add(key)
                self._core.call_done(self, item)
                return
        except ray.exceptions.RayActorError as e:
            self._core.worker_lost(self, item_error=self._crash(e, item))
            return
        except BaseException as e:
            exc = SerializationError(f"Ray could not stream {item.name}: {e}")
            exc.__cause__ = e
            self._core.call_done(self, item, exc=exc)
            return
        try:
            for _ in gen:  # drain what the actor yields until it sees the stop
                pass
        except BaseException:  # the call was abandoned: its end is all we need
            pass
        self._core.call_done(self, item)

    def cancel(self, item: WorkItem) -> None:
        if item.stream is not None and self.item is item and self.handle is not None:
            self.handle.stop_stream.options(concurrency_group="control").remote(item.seq)

    def _done(self, item: WorkItem, key: int, f: concurrent.futures.Future[Any]) -> None:
        ray = self._backend.ray
        try:
            msg = f.result()
        except ray.exceptions.RayActorError as e:
            self._core.worker_lost(self, item_error=self._crash(e, item))
            return
        except BaseException as e:  # the call never ran: arguments Ray could not move
            exc = SerializationError(f"Ray could not run {item.name}: {e}")
            exc.__cause__ = e
            self._core.call_done(self, item, exc=exc)
            return
        if isinstance(msg, EncodedException):
            self._core.call_done(self, item, exc=msg.rebuild())
            return
        try:
            out = _unpack(msg[1])
        except Exception as e:
            exc = SerializationError(f"the result of {item.name} could not be unpickled: {e}")
            exc.__cause__ = e
            self._core.call_done(self, item, exc=exc)
            return
        item.compute_s = msg[2]
        self.modules.add(key)
        self._core.call_done(self, item, out)

    def interrupt(self, item: WorkItem) -> bool:
        # The deadline passed: kill the actor; _done reports it lost once Ray confirms.
        if self.item is item:
            self._backend.ray.kill(self.handle, no_restart=True)
            return True
        return False

    def stop(self) -> None:
        # Dropping the last handle makes Ray end the actor once idle, so end its watch
        # first. (ray.kill() here could run in one of Ray's own callback threads, where it
        # deadlocks.)
        self._settle()
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.unwatch.remote()
        self._core.worker_lost(self)


class _RayBackend(Backend):
    def __init__(
        self,
        ray: Any,
        actor_cls: Any,
        threads: int,
        owns_ray: bool,
        options: dict[str, Any],
        start_timeout: float,
    ) -> None:
        self.ray = ray
        self.actor_cls = actor_cls
        self.threads = threads
        self.owns_ray = owns_ray
        self.options = options  # per actor: resources and scheduling strategy
        self.start_timeout = start_timeout
        self._lock = threading.Lock()
        self._refs: dict[int, tuple[Any, int, Any]] = {}  # id(module) -> (weakref, key, ref)
        self._keys = iter(range(1, 2**62))
        self._core: PoolCore | None = None

    def describe(self) -> str:
        o = self.options
        need = {"CPU": o["num_cpus"], "GPU": o["num_gpus"], **o["resources"]}
        return ", ".join(f"{k} {v:g}" for k, v in need.items() if v) or "no resources"

    def room(self) -> str:
        """What the alive nodes have free, for an error message."""
        try:
            free = self.ray.available_resources()
            alive = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        except Exception as exc:  # the cluster itself is unreachable
            return f"the cluster could not be asked for its resources ({exc})"
        keys = ["CPU", "GPU", *self.options["resources"]]
        have = ", ".join(f"{k} {free.get(k, 0):g}" for k in keys)
        return f"{alive} alive node{'s' if alive != 1 else ''} with {have} free"

    def new_worker(self, core: PoolCore) -> Worker:
        self._core = core
        return _RayWorker(self, core)

    def unshipped(self, fn: Any) -> bool:
        module = fn if isinstance(fn, torch.nn.Module) else method_owner(fn)
        if module is None:
            return False
        hit = self._refs.get(id(module))  # without the lock: a dict read is atomic
        return hit is None or hit[0]() is not module

    def prepare(self, c: Call) -> Any:
        module, method = c.module, None
        owner = method_owner(module)
        if owner is not None:
            module, method = owner, module.__name__  # a method of a module: ship it once
        try:
            call = _pack((c.args, c.kwargs))  # one object: a tensor in both arrives as one
        except Exception as exc:
            raise SerializationError(
                f"the arguments of {c.name} could not be pickled: {type(exc).__name__}: {exc}"
            ) from exc
        with self._lock:
            hit = self._refs.get(id(module))
            if hit is not None and hit[0]() is module:
                return hit[1], hit[2], call, method
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
        return key, ref, call, method

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


_STRATEGIES = ("DEFAULT", "SPREAD")


def _check_capacity(ray: Any, workers: int, need: dict[str, float], strategy: Any) -> str | None:
    """Why Ray could never place ``workers`` actors needing ``need`` each, or None."""
    total = ray.cluster_resources()
    for res, each in need.items():
        if each and total.get(res, 0) < workers * each:
            what = {"CPU": "num_cpus_per_worker", "GPU": "num_gpus_per_worker"}.get(
                res, f"resources_per_worker[{res!r}]"
            )
            return (
                f"workers={workers} x {what}={each:g} needs {workers * each:g} {res}s but "
                f"the Ray cluster has {total.get(res, 0):g}: Ray would wait forever to place "
                "the actors"
            )
    if not isinstance(strategy, str):
        return None  # placement groups and node affinity: Ray's own rules
    fits = []
    for n in ray.nodes():
        if n.get("Alive"):
            have = n.get("Resources", {})
            per = [int(have.get(r, 0) / e + 1e-9) for r, e in need.items() if e]
            fits.append(min(per) if per else workers)
    if sum(fits) < workers:
        needs = ", ".join(f"{k} {v:g}" for k, v in need.items() if v)
        return (
            f"workers={workers} actors needing {needs} "
            f"each: the cluster's nodes can hold only {sum(fits)} of them (an actor lives on "
            "one node): Ray would wait forever to place the rest"
        )
    return None


class RayPool(Pool):
    """Run forward passes on Ray actors: the aioforward API across a cluster.

    Example::

        async with aioforward.RayPool(workers=4, address="auto",
                                      scheduling_strategy="SPREAD") as pool:
            ya, yb = await pool.run_parallel(encoder_a, encoder_b, x)
            print(pool.worker_nodes())   # {node id: [actor pids]}

    Arguments:
        workers: actors, i.e. calls in flight.
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``,
            ``"10.0.0.5:6379"``) when Ray is not initialised in this process yet;
            by default an already initialised Ray, else a local one started
            here. A Ray the pool started is shut down when the pool closes.
        num_cpus_per_worker, num_gpus_per_worker, resources_per_worker: what
            each actor reserves (the last: custom resources, e.g.
            ``{"accelerator_type:A10G": 0.1}``). Ray waits silently forever for
            actors it cannot place, so the pool refuses up front when the
            cluster, node by node, cannot hold ``workers`` such actors.
        scheduling_strategy: where Ray puts the actors: ``"DEFAULT"`` (Ray
            packs them onto nodes), ``"SPREAD"`` (over as many nodes as
            possible), or a ``ray.util.scheduling_strategies`` object
            (placement group, node affinity). Replacements use it too.
        start_timeout: seconds an actor may take to be placed and started
            (default 60). After that it is given up: waiting calls fail with
            ``WorkerStartError`` if no other actor is up, and the pool retries
            with back-off (0.1 s doubling to 5 s), so a node added later is used.
        threads_per_worker: torch intra-op threads in each actor (default: the
            actor's CPUs; 0 leaves torch alone).
        max_queued: waiting calls allowed before ``QueueFullError``.
        init_kwargs: passed to ``ray.init`` when the pool starts or joins Ray.

    Ray is joined (or started) when the pool is constructed, so that an
    impossible placement fails at once; the actors start on first use.
    Modules are put in Ray's object store once (on their first call) and kept
    by each actor after its first call with them; :meth:`reload` ships a
    changed module again. CPU tensors of 256 KiB or more cross as numpy views
    of their storage: one copy into the object store, none out of it; the
    tensors a call returns view the object-store memory (writable, yours
    alone) and hold it while they live. Exceptions keep their type with the
    actor's traceback as ``__cause__``.

    Node loss: calls on the actors of a node that dies fail with
    ``WorkerCrashedError`` naming the actor's pid and node; calls elsewhere
    are untouched; each lost actor is replaced at once where Ray can place
    it, counted in ``stats().restarts``.
    """

    _kind = "ray"

    def __init__(
        self,
        workers: int = 2,
        *,
        address: str | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        resources_per_worker: dict[str, float] | None = None,
        scheduling_strategy: Any = "DEFAULT",
        start_timeout: float = 60.0,
        threads_per_worker: int | None = None,
        max_queued: int | None = None,
        name: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_int("workers", workers, 1)
        check_number("num_cpus_per_worker", num_cpus_per_worker)
        check_number("num_gpus_per_worker", num_gpus_per_worker)
        if resources_per_worker is not None:
            if not isinstance(resources_per_worker, dict):
                raise TypeError(
                    f"resources_per_worker must be a dict or None, got {resources_per_worker!r}"
                )
            for res, each in resources_per_worker.items():
                if not isinstance(res, str) or res in ("CPU", "GPU"):
                    raise ValueError(
                        f"resources_per_worker keys must be custom resource names (use "
                        f"num_cpus_per_worker/num_gpus_per_worker for CPU/GPU), got {res!r}"
                    )
                check_number(f"resources_per_worker[{res!r}]", each)
        check_number("start_timeout", start_timeout, positive=True)
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
        from ray.util import scheduling_strategies as ss

        strategy_types = tuple(
            getattr(ss, n)
            for n in (
                "PlacementGroupSchedulingStrategy",
                "NodeAffinitySchedulingStrategy",
                "NodeLabelSchedulingStrategy",
            )
            if hasattr(ss, n)
        )
        if not (
            (isinstance(scheduling_strategy, str) and scheduling_strategy in _STRATEGIES)
            or isinstance(scheduling_strategy, strategy_types)
        ):
            raise ValueError(
                "scheduling_strategy must be 'DEFAULT', 'SPREAD' or a "
                f"ray.util.scheduling_strategies object, got {scheduling_strategy!r}"
            )
        owns_ray = False
        if not ray.is_initialized():
            kwargs = {"log_to_driver": False, **(init_kwargs or {})}
            if address is None:
                kwargs.setdefault("include_dashboard", False)  # only for a Ray started here
            ray.init(address=address, **kwargs)
            owns_ray = True
        need = {"CPU": num_cpus_per_worker, "GPU": num_gpus_per_worker}
        need.update(resources_per_worker or {})
        refused = _check_capacity(ray, workers, need, scheduling_strategy)
        if refused is not None:
            if owns_ray:
                ray.shutdown()
            raise ValueError(refused)
        options = {
            "num_cpus": num_cpus_per_worker,
            "num_gpus": num_gpus_per_worker,
            "resources": dict(resources_per_worker or {}),
            "scheduling_strategy": scheduling_strategy,
        }
        backend = _RayBackend(
            ray,
            # watch() in a group of its own: forward calls still run one at a time
            ray.remote(concurrency_groups={"watch": 1, "control": 1})(_Actor),  # type: ignore[call-overload]
            threads_per_worker,
            owns_ray,
            options,
            float(start_timeout),
        )
        super().__init__(backend, workers=workers, max_queued=max_queued, name=name)

    def worker_nodes(self) -> dict[str, list[int]]:
        """Where the actors live: Ray node id -> pids of the started actors on it.

        Example::

            pool = aioforward.RayPool(workers=4, scheduling_strategy="SPREAD")
            await pool.wait_ready()
            {node[:8]: len(pids) for node, pids in pool.worker_nodes().items()}
            # {'5f4a6b2a': 2, 'de84d47f': 2}
        """
        out: dict[str, list[int]] = {}
        for w in self._core.live_workers():
            if isinstance(w, _RayWorker) and w.node is not None and w.pid is not None:
                out.setdefault(w.node, []).append(w.pid)
        return out
