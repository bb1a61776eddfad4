"""Modules cross once: each module is pickled once, its weights copied once into shared
memory that every worker maps; a worker receives a module on its first call with it.

A module is known by ``(id(module), version)``. ``reload`` and the module's
garbage collection release a version: the workers that hold it are told to
drop it with their next call (a per-worker set, so nothing accumulates for
workers that never held it, or that died).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..._call import ModuleSpec, method_owner
from ...errors import PoolClosedError, SerializationError
from . import _transport as tr
from ._messages import Load

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._pool import ProcessWorker

__all__ = ["ModuleShipper"]

ModuleKey = tuple[Any, ...]


class ModuleShipper:
    """Shipped modules of one pool, and which worker holds which."""

    def __init__(self, prefix: str, shm_limit: int | None, memfd: bool) -> None:
        self._prefix = prefix
        self._shm_limit = shm_limit
        self._memfd = memfd
        # Re-entrant: a module's weakref callback may run inside a garbage collection
        # triggered while this thread already holds the lock.
        self._lock = threading.RLock()
        self._shipped: dict[int, tuple[weakref.ref[torch.nn.Module], int, tr.ShippedModule]] = {}
        self._specs: dict[int, ModuleSpec] = {}  # kept alive so their ids are never reused
        self._versions = itertools.count()
        self._ship_lock = threading.Lock()  # held while a module is shipped (see _ship)
        self._workers: Callable[[], Iterable[ProcessWorker]] = tuple
        self._closed = False

    def watch(self, workers: Callable[[], Iterable[ProcessWorker]]) -> None:
        """Where to find the live workers when a module is released."""
        self._workers = workers

    def reference(self, fn: Any) -> tuple[ModuleKey | None, tuple[Any, ...]]:
        """The key and the reference to pickle into a call for ``fn``."""
        if isinstance(fn, torch.nn.Module):
            key = self._ship(fn)
            return key, ("m", key)
        if isinstance(fn, ModuleSpec):
            skey = ("spec", id(fn))
            with self._lock:
                self._specs[id(fn)] = fn
            return skey, ("spec", skey, fn)
        owner = method_owner(fn)
        if owner is not None:
            key = self._ship(owner)  # a method of a module: ship the module once
            return key, ("meth", key, fn.__name__)
        return None, ("fn", fn)

    def unshipped(self, fn: Any) -> bool:
        """Whether :meth:`reference` would ship ``fn`` (a module, or a module's method) now."""
        module = fn if isinstance(fn, torch.nn.Module) else method_owner(fn)
        return module is not None and self._shipped_key(module) is None

    def _shipped_key(self, module: torch.nn.Module) -> ModuleKey | None:
        """The key of ``module``'s current shipped version, if any. Without the lock: it runs
        for every call, and a dict read is atomic (``_ship`` checks again under its lock)."""
        mid = id(module)
        hit = self._shipped.get(mid)
        if hit is not None and hit[0]() is module:
            return (mid, hit[1])
        return None

    def _ship(self, module: torch.nn.Module) -> ModuleKey:
        key = self._shipped_key(module)
        if key is not None:
            return key
        # One thread ships at a time: two first calls of a module from two threads (a
        # Batcher's flusher and a task) would each ship it, and the second would release
        # the version the first call is about to run.
        with self._ship_lock:
            key = self._shipped_key(module)
            if key is not None:
                return key
            return self._ship_new(module)

    def _ship_new(self, module: torch.nn.Module) -> ModuleKey:
        mid = id(module)
        version = next(self._versions)
        try:
            shipped = tr.ship_module(
                module, f"{self._prefix}m{version}", self._shm_limit, self._memfd
            )
        except SerializationError:  # shared memory is short: the message already says so
            raise
        except Exception as exc:
            # the class of the module or of a submodule is defined in a function (pickle says
            # so, naming it; a class that pickles itself, fx's GraphModule, is left alone)
            local = next(
                (
                    type(m)
                    for m in module.modules()
                    if "<locals>" in type(m).__qualname__ and type(m).__qualname__ in str(exc)
                ),
                None,
            )
            if local is not None:  # the common case, and its fix is simpler than a spec
                raise SerializationError(
                    f"cannot send module {type(module).__name__} to a worker process: a class "
                    f"{local.__module__}.{local.__qualname__} is defined inside a function, and "
                    "a worker can only rebuild classes it can import by name. Define it at the "
                    "top level of a module or of your script (outside "
                    '`if __name__ == "__main__":`)'
                ) from exc
            where = tr.find_unpicklable(module)
            what = f"attribute {where}" if where else "it"
            raise SerializationError(
                f"cannot send module {type(module).__name__} to a worker process: {what} cannot "
                f"be pickled ({type(exc).__name__}: {exc}). Build the module inside each worker "
                "instead: aioforward.ModuleSpec(factory, *args), with factory an importable "
                "function that returns the module"
            ) from exc

        def forget(_ref: Any, mid: int = mid, version: int = version) -> None:
            self._release(mid, version)

        with self._lock:
            if self._closed:  # the pool closed while this thread shipped it
                shipped.release()
                raise PoolClosedError(
                    f"the pool was closed while {type(module).__name__} was shipped to it"
                )
            old = self._shipped.get(mid)
            self._shipped[mid] = (weakref.ref(module, forget), version, shipped)
        if old is not None:
            self._drop((mid, old[1]), old[2])
        return (mid, version)

    def _release(self, mid: int, version: int) -> None:
        with self._lock:
            cur = self._shipped.get(mid)
            if cur is None or cur[1] != version:
                return
            del self._shipped[mid]
        self._drop((mid, version), cur[2])

    def _drop(self, key: ModuleKey, shipped: tr.ShippedModule) -> None:
        with self._lock:
            for w in self._workers():
                if key in w.modules:
                    w.modules.discard(key)
                    w.drops.add(key)
        shipped.release()

    def reload(self, module: torch.nn.Module) -> None:
        """Release the shipped version of ``module``; its next call ships it again."""
        with self._lock:
            hit = self._shipped.get(id(module))
        if hit is not None:
            self._release(id(module), hit[1])

    def for_worker(
        self, w: ProcessWorker, key: ModuleKey | None, name: str
    ) -> tuple[Load | None, tr.Segment | None, tuple[Any, ...]]:
        """What worker ``w`` needs with a call of ``key``: the module (if it lacks it), its
        weight segment (if new to it) and the module keys it must drop first."""
        with self._lock:
            drops = tuple(w.drops)
            w.drops.clear()
            if key is None or key[0] == "spec" or key in w.modules:
                return None, None, drops
            entry = self._shipped.get(key[0])
            if entry is None or entry[1] != key[1]:
                raise RuntimeError(f"{name} was released before it could run")
            shipped = entry[2]
            seg = shipped.seg
            w.modules.add(key)
            return Load(key, shipped.blob, seg.sid if seg else None), seg, drops

    def close(self) -> None:
        with self._lock:
            self._closed = True
            shipped = [e[2] for e in self._shipped.values()]
            self._shipped.clear()
            self._specs.clear()
        for s in shipped:
            s.release()
