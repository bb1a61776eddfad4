"""Open pools and Batchers, for ``aioforward.metrics`` (weak: registering keeps nothing alive).

Every pool and every :class:`~aioforward.Batcher` registers itself in its
constructor; ``aioforward.metrics`` asks here which of them are still open at
each scrape. Each object gets a serial number when it registers, so listings come
in creation order and two objects with the same name can still be told apart.
Constructors run on any thread, hence the lock.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Any

__all__ = ["open_batchers", "open_pools", "register_batcher", "register_pool", "serial"]

_lock = threading.Lock()
_serials = itertools.count(1)
_pools: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_batchers: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def register_pool(pool: Any) -> None:
    """Called by every pool's constructor (again is harmless)."""
    with _lock:
        if pool not in _pools:
            _pools[pool] = next(_serials)


def register_batcher(batcher: Any) -> None:
    """Called by every Batcher's constructor (again is harmless)."""
    with _lock:
        if batcher not in _batchers:
            _batchers[batcher] = next(_serials)


def serial(obj: Any) -> int:
    """The number ``obj`` got when it registered (unique in this process); 0 if it did not."""
    with _lock:
        return _pools.get(obj) or _batchers.get(obj) or 0


def _alive(registry: weakref.WeakKeyDictionary[Any, int]) -> list[Any]:
    with _lock:
        items = list(registry.items())
    items.sort(key=lambda kv: kv[1])
    return [obj for obj, _ in items if not obj.closed]


def open_pools() -> list[Any]:
    """The pools that exist and are not closed, oldest first."""
    return _alive(_pools)


def open_batchers() -> list[Any]:
    """The Batchers that exist and are not closed, oldest first."""
    return _alive(_batchers)
