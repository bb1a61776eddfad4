"""Cooperative cancellation: a running forward pass stops at its next block boundary.

A cancel or a timeout sets a flag for the call; a forward pre-hook on each
*block* of the module (a member of an ``nn.ModuleList``/``nn.Sequential`` that
has submodules of its own: a transformer layer, a residual stage) checks it and raises
:class:`CallCancelled` inside the worker. The pass unwinds like any exception,
the worker reports the call ended and takes the next one: its thread or
process, its weights and its warm memory survive.

Where the flag lives:

* a worker thread: the call's :class:`~aioforward.pools._worker.WorkItem`,
  found through a thread-local (``enter``/``leave`` around the call);
* a worker process: a 64-bit word in shared memory the parent writes (the
  sequence number of the call to stop), read without a system call.

Leaf layers (``Linear``, ``Conv2d``, ...) and the parts inside a block get no
hook: a hook takes a module off torch's fast call path (about 1.5 us per
hooked module here), which would cost a small model a quarter of its forward
pass. A model without such stacked blocks is checked once, before it starts
(in a process); the pool's grace period (``cancel_grace``) covers the rest.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .pools._worker import WorkItem

__all__ = ["CallCancelled", "blocks", "install_hooks"]


class CallCancelled(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised inside a worker to unwind a forward pass whose call was cancelled.

    Callers never see it: their future was already cancelled or timed out.
    """


_local = threading.local()


class _ProcessFlag:
    """The worker process's view of its control word (set once the parent sends it)."""

    word: ctypes.c_int64 | None = None
    seq = -1  # the call running here


_process = _ProcessFlag()


def enter(item: WorkItem) -> None:
    """The current thread starts running ``item``."""
    _local.item = item


def leave() -> None:
    _local.item = None


def set_process_word(address: int) -> None:
    """In a worker process: the parent writes the seq of a call to stop at ``address``."""
    _process.word = ctypes.c_int64.from_address(address)


def set_process_seq(seq: int) -> None:
    _process.seq = seq


def cancel_requested() -> bool:
    """Whether the call running in this thread (or worker process) should stop now."""
    item = getattr(_local, "item", None)
    if item is not None:
        return bool(item.cancel_requested)
    word = _process.word
    return word is not None and word.value == _process.seq


def check() -> None:
    """Raise :class:`CallCancelled` if the running call was cancelled."""
    if cancel_requested():
        raise CallCancelled("the call was cancelled")


def _pre_hook(module: torch.nn.Module, args: Any) -> None:
    # The hot path: one thread-local read (threads) or one shared word (processes).
    item = getattr(_local, "item", None)
    if item is not None:
        if item.cancel_requested:
            raise CallCancelled(f"cancelled before {type(module).__name__}")
        return
    word = _process.word
    if word is not None and word.value == _process.seq:
        raise CallCancelled(f"cancelled before {type(module).__name__}")


def blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules whose entry is a cancellation point: the members of a stack
    (``nn.ModuleList``/``nn.Sequential``) that have submodules of their own, i.e. the
    repeated layers of a deep model, however deeply nested.

    Example: ``blocks(nn.TransformerEncoder(layer, 24))`` is its 24 layers.
    """
    from torch import nn

    return [
        child
        for m in module.modules()
        if isinstance(m, nn.ModuleList | nn.Sequential)
        for child in m.children()
        if next(child.children(), None) is not None
    ]


class HookSet:
    """Hooks a pool put on modules it runs; removed with :meth:`remove` (at the pool's close).

    The hooks only read flags, so a module keeps working normally when called
    outside the pool (they are no-ops there, at the cost of the slow call path).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: weakref.WeakKeyDictionary[torch.nn.Module, list[Any]] = (
            weakref.WeakKeyDictionary()
        )

    def install(self, module: torch.nn.Module) -> None:
        if module in self._done:
            return
        with self._lock:
            if module not in self._done:
                self._done[module] = install_hooks(module)

    def remove(self) -> None:
        with self._lock:
            handles = [h for hs in self._done.values() for h in hs]
            self._done.clear()
        for h in handles:
            h.remove()


def install_hooks(module: torch.nn.Module) -> list[Any]:
    """Put the cancellation pre-hook on every block of ``module``; return the handles."""
    return [m.register_forward_pre_hook(_pre_hook) for m in blocks(module)]
