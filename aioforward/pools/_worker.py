"""The worker interface a backend implements, and the work item that travels to a worker.

A backend is one small class per kind of worker (a thread, a process, a Ray
actor). The pool's core (:class:`~aioforward.pools._base.PoolCore`) owns every
worker and every count about them; a worker only starts, runs one call at a
time, can be interrupted, and stops. It reports back by calling the core:

* ``core.worker_ready(w)`` once it can take calls;
* ``core.call_done(w, item, result, exc)`` when a call ends (``retire=True``
  when the worker must not take another call, e.g. ``max_calls_per_worker``);
* ``core.worker_lost(w, ...)`` when it died, while starting or running.

A streaming call (``item.stream`` is a :class:`~aioforward._stream.Channel`)
pushes each item it yields into the channel before ``call_done``. A cancel or
a timeout calls :meth:`Worker.cancel` first (stop at the next block boundary,
keeping the worker); only a call still running after the pool's grace period
is :meth:`Worker.interrupt`-ed.

The core calls ``start``, ``run``, ``interrupt`` and ``stop``; never while
holding its lock, and ``run`` only on a worker it reserved for that item. This
is trio-parallel's ``AbstractWorker`` with its ``WorkerCache``, or CPython's
manager thread with its ``_CallItem``/``_ResultItem``, in one small contract.
"""

from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._call import Call
    from .._future import ForwardFuture
    from .._stream import Channel

__all__ = ["WorkItem", "Worker"]


class WorkItem:
    """One call travelling through a pool."""

    __slots__ = (
        "__weakref__",
        "call",
        "cancel_requested",
        "compute_s",
        "deadline",
        "future",
        "interrupted",
        "payload",
        "seq",
        "started",
        "stream",
        "t_start",
        "t_submit",
        "timer",
        "transfer_s",
        "worker",
    )

    def __init__(
        self,
        c: Call,
        future: ForwardFuture[Any],
        deadline: float | None,
        seq: int,
        payload: Any,
        stream: Channel | None = None,
    ) -> None:
        self.call = c
        self.future = future
        self.deadline = deadline
        self.seq = seq
        self.payload = payload  # what the backend prepared at submit (e.g. pickled bytes)
        self.started = False  # a worker was reserved for it
        self.worker: Worker | None = None
        self.stream = stream  # where a streaming call's items go
        self.cancel_requested = False  # read by the cancellation checks (aioforward._cancel)
        self.interrupted = False  # the core decided to interrupt it: its worker takes no more
        self.t_submit = time.perf_counter()
        self.t_start = 0.0
        self.compute_s = 0.0
        self.transfer_s = 0.0
        self.timer: list[Any] | None = None  # the core's timer entry for its deadline

    @property
    def name(self) -> str:
        return self.call.name

    def request_cancel(self) -> None:
        """Ask the running call to stop at its next block boundary (or stream item)."""
        self.cancel_requested = True
        if self.stream is not None:
            self.stream.stop()

    def release_inputs(self) -> None:
        """Drop references to the call's arguments (they may be large tensors)."""
        self.payload = None


class Worker(abc.ABC):
    """One worker of a pool: runs one call at a time.

    Attributes the core reads: ``pid`` (the process id where the worker has
    one of its own, else ``None``). Attributes the core owns: ``item`` (the
    call it runs), ``ready``.
    """

    pid: int | None = None
    interruptible = False  # interrupt() can stop a running call (a process can be killed)

    def __init__(self) -> None:
        self.item: WorkItem | None = None
        self.ready = False  # set by the core in worker_ready
        self.stopping = False  # the core asked it to stop: its exit is the normal end

    @abc.abstractmethod
    def start(self) -> None:
        """Begin starting; report ``worker_ready`` or ``worker_lost`` later (any thread)."""

    @abc.abstractmethod
    def run(self, item: WorkItem) -> None:
        """Begin running ``item``; report ``call_done`` or ``worker_lost`` when it ends."""

    def run_awaited(self, item: WorkItem, loop: Any) -> Any:
        """Begin running ``item`` for a task of the asyncio ``loop`` (None under trio) that
        awaits it at once. A worker whose reply the awaiting task can read itself returns a
        generator function for the task to drive (``reader(future, loop, box)``, see
        ``ProcessWorker``); by default it runs the call as usual and returns None."""
        self.run(item)
        return None

    def cancel(self, item: WorkItem) -> None:  # noqa: B027 - optional hook
        """Tell the worker running ``item`` to stop it cooperatively (``item.cancel_requested``
        is already set; a thread reads it, a process needs telling)."""

    def interrupt(self, item: WorkItem) -> bool:
        """Stop the running ``item`` by force if this kind of worker can (a process can be
        killed, a thread cannot); return whether it will. The worker still reports the end."""
        return False

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask this idle (or never started) worker to exit; do not wait."""

    def join(self, timeout: float | None) -> None:  # noqa: B027 - optional hook
        """Wait until the worker has exited (after :meth:`stop`)."""
