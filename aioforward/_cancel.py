"""Cooperative cancellation: a running forward pass stops at its next block boundary.

A cancel or a timeout sets a flag for the call. The *stacks* of the module
(every ``nn.ModuleList`` and ``nn.Sequential`` in it: a transformer's layers, a
network's stages) check the flag each time the forward pass takes their next
member, and raise :class:`CallCancelled` inside the worker. The pass unwinds
like any exception, the worker reports the call ended and takes the next one:
its thread or process, its weights and its warm memory survive.

How a stack checks: the pool gives it a subclass of its own class whose
``__iter__`` (what ``for layer in self.layers`` and ``nn.Sequential.forward``
use) checks before each member; a slice (``self.layers[:n]``) keeps the
subclass. This costs about 0.1 us per member, where a forward pre-hook would
cost 1.5 us and switch off torch's fused fast paths (``nn.TransformerEncoderLayer``
refuses its fast path when any hook is attached: 5% of a forward pass here).
A thread pool gives the classes back when it closes; a worker process changes
only its own copies. Only exact ``nn.ModuleList``/``nn.Sequential`` instances
are changed, never user subclasses.

Where the flag lives:

* a worker thread: the call's :class:`~aioforward.pools._worker.WorkItem`,
  found through the thread-local ``local.item``, set by the pool around the call;
* a worker process: a 64-bit word in shared memory the parent writes (the
  sequence number of the call to stop), read without a system call.

A model without stacks (a few layers called by name, or a plain
``nn.Sequential`` of leaf layers) is checked once, before it starts, in a
process; the pool's grace period (``cancel_grace``) covers the rest.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

__all__ = ["CallCancelled", "Checks", "check_cancelled", "install_checks", "stacks"]


class CallCancelled(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised inside a worker to unwind a forward pass whose call was cancelled.

    Callers never see it: their future was already cancelled or timed out.
    """


local = threading.local()  # .item: the WorkItem running in this thread (set by a pool)


class _ProcessFlag:
    """The worker process's view of its control word (set once the parent sends it)."""

    word: ctypes.c_int64 | None = None
    seq = -1  # the call running here


_process = _ProcessFlag()


def set_process_word(address: int) -> None:
    """In a worker process: the parent writes the seq of a call to stop at ``address``."""
    _process.word = ctypes.c_int64.from_address(address)


def set_process_seq(seq: int) -> None:
    _process.seq = seq


def cancel_requested() -> bool:
    """Whether the call running in this thread (or worker process) should stop now."""
    item = getattr(local, "item", None)
    if item is not None:
        return bool(item.cancel_requested)
    word = _process.word
    return word is not None and word.value == _process.seq


def check_cancelled() -> None:
    """Raise inside a worker if the call running there was cancelled or timed out (public as
    ``aioforward.check_cancelled``); a no-op anywhere else.

    Example, between the steps of a long loop of your own in a module's forward::

        for step in range(steps):
            aioforward.check_cancelled()
            x = self.step(x)
    """
    if cancel_requested():
        raise CallCancelled("the call was cancelled")


class _Checking(nn.Module):
    """Iterating the members checks before each one (a stack's forward iterates them)."""

    def __iter__(self) -> Iterator[nn.Module]:
        for m in self._modules.values():
            if cancel_requested():
                raise CallCancelled(f"cancelled before {type(m).__name__}")
            yield m  # type: ignore[misc]


class _CheckedModuleList(_Checking, nn.ModuleList):
    pass


class _CheckedSequential(_Checking, nn.Sequential):
    pass


_CHECKED: dict[type[nn.Module], type[nn.Module]] = {
    nn.ModuleList: _CheckedModuleList,
    nn.Sequential: _CheckedSequential,
}
_ORIGINAL = {v: k for k, v in _CHECKED.items()}
for _checked, _original in _ORIGINAL.items():
    # The checks are invisible: a checked module's repr, and the errors that name it
    # ("Sequential did not finish within its timeout"), keep the original class name.
    _checked.__name__ = _checked.__qualname__ = _original.__name__


def stacks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The stacks of ``module`` (exact ``nn.ModuleList``/``nn.Sequential`` instances) whose
    members are cancellation points. The module itself counts only when some member has
    submodules: a small ``nn.Sequential`` of leaf layers would pay a tenth of its forward
    pass for checks it does not need (it is checked when it starts).

    Example: ``stacks(nn.TransformerEncoder(layer, 24)) == [encoder.layers]``.
    """
    return [
        m
        for m in module.modules()
        if (type(m) in _CHECKED or type(m) in _ORIGINAL)
        and (m is not module or any(next(c.children(), None) is not None for c in m.children()))
    ]


def install_checks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Make every stack of ``module`` check for cancellation; return those changed."""
    changed = []
    for m in stacks(module):
        checked = _CHECKED.get(type(m))
        if checked is not None:
            m.__class__ = checked
            changed.append(m)
    return changed


def remove_checks(changed: list[torch.nn.Module]) -> None:
    for m in changed:
        original = _ORIGINAL.get(type(m))
        if original is not None:
            m.__class__ = original


class Checks:
    """The stacks a pool made checking, given back with :meth:`remove` (at the pool's close).

    The checks only read flags, so a module keeps working normally when called
    outside the pool.
    """

    def __init__(self) -> None:
        # Re-entrant: a module's weakref callback may run in a garbage collection triggered
        # while this thread holds the lock.
        self._lock = threading.RLock()
        # id(module) -> (a weak reference to it, the stacks changed): looked up once per call
        self._done: dict[int, tuple[weakref.ref[torch.nn.Module], list[nn.Module]]] = {}

    def install(self, module: torch.nn.Module) -> None:
        hit = self._done.get(id(module))
        if hit is not None and hit[0]() is module:
            return
        with self._lock:
            hit = self._done.get(id(module))
            if hit is None or hit[0]() is not module:
                key = id(module)
                ref = weakref.ref(module, lambda _r: self._forget(key, _r))
                self._done[key] = (ref, install_checks(module))

    def _forget(self, key: int, ref: weakref.ref[torch.nn.Module]) -> None:
        with self._lock:
            hit = self._done.get(key)
            if hit is not None and hit[0] is ref:
                del self._done[key]

    def remove(self) -> None:
        with self._lock:
            changed = [m for _, ms in self._done.values() for m in ms]
            self._done.clear()
        remove_checks(changed)
