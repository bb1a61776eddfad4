"""CudaStreamPool: each module on its own CUDA stream, so different modules overlap on one GPU.

Data flow::

    submit() ── event on the caller's current stream (its inputs are ready after it)
       │
       └─SimpleQueue──> launch thread: module's stream waits for that event
                          CPU inputs -> pinned -> device (non_blocking, on the stream)
                          module(*args) launched on the stream (no_grad)
                          outputs -> pinned CPU (non_blocking) when to_cpu=True
                          done-event recorded; event.synchronize() sleeps in the
                          driver (a blocking event: no core spins) until the GPU is done
       ForwardFuture <── set_result ─┘   (outputs marked as used by the default stream)

A launch thread is a worker of the base :class:`ThreadPool`, so capacity,
queueing, cancellation, timeouts and stats are the same as everywhere else;
``workers`` bounds the calls in flight. Kernels of the same module are ordered
on its stream; kernels of different modules run concurrently where the GPU has
room (small kernels, or copies overlapping compute).

Caching-allocator safety: inputs used on a module's stream are marked with
``record_stream`` so that freeing them in the caller cannot hand their memory
to other work too early, and outputs are marked as used by the device's
default stream, where callers usually consume them.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .._call import Call, module_name
from .._tree import flatten, unflatten
from ..errors import DeviceError
from .thread import ThreadBackend, ThreadPool

if TYPE_CHECKING:
    from ._worker import WorkItem

__all__ = ["CudaStreamPool", "cuda_unavailable_reason"]


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here, or ``None`` when it can.

    Example: ``if (why := cuda_unavailable_reason()) is None: pool = CudaStreamPool()``.
    """
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} is built with CUDA {torch.version.cuda} but "
            "torch.cuda.is_available() is False (no GPU, no driver, or "
            "CUDA_VISIBLE_DEVICES hides it)"
        )
    return None


class CudaStreamPool(ThreadPool):
    """Run forward passes on CUDA, one stream per module, awaited without blocking the loop.

    Example::

        async with aioforward.CudaStreamPool("cuda:0") as pool:
            ya, yb = await pool.run_parallel(encoder_a, encoder_b, x)   # overlapped on the GPU

    Arguments:
        device: the CUDA device (default: the current one). Without CUDA the
            constructor raises :class:`~aioforward.DeviceError` with the reason.
        workers: launch threads, i.e. calls in flight (default 4).
        to_cpu: copy outputs back to (pinned) CPU memory; by default they stay
            on the device.
        cancel_checks: make the modules' stacks check for cancellation before
            each member, as in :class:`ThreadPool` (default True).
        cancel_grace: seconds a cancelled call has to stop before it counts in
            ``stats().overran``, as in :class:`ThreadPool`.
        max_queued: waiting calls allowed before ``QueueFullError``.

    Device policy: a module must already be on ``device`` (a ``ModuleSpec`` is
    built and moved there); CPU tensors in the inputs are copied to ``device``;
    a tensor on another CUDA device raises ``DeviceError`` naming both devices,
    at ``submit``, before a slot is reserved. Cancellation stops launching at the
    module's next block (as in every pool) but cannot stop kernels already
    launched: the caller is released at once and the slot returns when the GPU
    is done with them.
    """

    _kind = "cuda"

    def __init__(
        self,
        device: str | int | torch.device | None = None,
        *,
        workers: int = 4,
        to_cpu: bool = False,
        cancel_checks: bool = True,
        cancel_grace: float = 1.0,
        max_queued: int | None = None,
        name: str | None = None,
    ) -> None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceError(f"CudaStreamPool needs CUDA: {reason}")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        dev = torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
        if dev.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device!r}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        assert dev.index is not None
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {dev} does not exist: this process sees "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        self.device = dev
        self.to_cpu = bool(to_cpu)
        super().__init__(
            workers,
            threads_per_worker=0,
            cancel_checks=cancel_checks,
            cancel_grace=cancel_grace,
            max_queued=max_queued,
            name=name,
        )

    def _backend(self, name: str) -> ThreadBackend:
        return CudaBackend(name, self.device, self.to_cpu, self.cancel_checks, self.cancel_grace)


class CudaBackend(ThreadBackend):
    """Launch threads that run each module on its own CUDA stream."""

    def __init__(
        self,
        name: str,
        device: torch.device,
        to_cpu: bool,
        cancel_checks: bool,
        cancel_grace: float,
    ) -> None:
        super().__init__(
            name,
            threads_per_worker=0,
            grad=False,
            cancel_checks=cancel_checks,
            cancel_grace=cancel_grace,
        )
        self.device = device
        self.to_cpu = to_cpu
        self._streams: weakref.WeakKeyDictionary[torch.nn.Module, torch.cuda.Stream] = (
            weakref.WeakKeyDictionary()
        )
        self._placed: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
        self._no_module = torch.nn.Module()  # the stream key of plain generator functions

    def prepare(self, c: Call) -> Any:
        """Check devices in the caller's thread; mark where its inputs are ready."""
        module = c.module
        if isinstance(module, torch.nn.Module) and module not in self._placed:
            for t in itertools.chain(module.parameters(), module.buffers()):
                if t.device != self.device:
                    raise DeviceError(
                        f"module {module_name(module)} has a tensor on {t.device} but the pool "
                        f"runs on {self.device}: move it with module.to({str(self.device)!r})"
                    )
            self._placed.add(module)  # checked once; moving it later is the caller's business
        leaves, spec = flatten((c.args, c.kwargs))  # kept for the launch thread
        on_device = False
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cuda":
                if leaf.device != self.device:
                    raise DeviceError(
                        f"an input of {module_name(module)} is on {leaf.device} but the module "
                        f"runs on {self.device}: move the input, or use a pool on {leaf.device}"
                    )
                on_device = True
        ready = None
        if on_device:
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record(torch.cuda.current_stream(self.device))
        return ready, leaves, spec

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)

    def stream(self, module: torch.nn.Module) -> torch.cuda.Stream:
        with self._spec_lock:
            stream = self._streams.get(module)
            if stream is None:
                stream = self._streams[module] = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            return stream

    def forward(self, item: WorkItem, module: torch.nn.Module) -> Any:
        ready, leaves, spec = item.payload
        stream = self.stream(module)
        with torch.cuda.device(self.device):
            if ready is not None:
                stream.wait_event(ready)  # the caller's kernels producing the inputs
            with torch.cuda.stream(stream):
                args, kwargs = unflatten(spec, iter([self.upload(v, stream) for v in leaves]))
                with torch.no_grad():  # results behave like a direct call's
                    out = module(*args, **kwargs)
                return self.finish_item(out)

    def stream_items(
        self,
        item: WorkItem,
        fn: Any,
        module: torch.nn.Module | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """A streaming call on the module's stream; each item is synchronised before the
        consumer sees it (:meth:`finish_item`)."""
        ready, leaves, spec = item.payload
        stream = self.stream(module) if module is not None else self.stream(self._no_module)
        with torch.cuda.device(self.device):
            if ready is not None:
                stream.wait_event(ready)
            with torch.cuda.stream(stream):
                args, kwargs = unflatten(spec, iter([self.upload(v, stream) for v in leaves]))
                super().stream_items(item, fn, module, args, kwargs)

    def finish_item(self, value: Any) -> Any:
        """Outputs (a result, or a streamed item) made safe for the caller, on the current
        (the module's) stream: copied to pinned CPU memory with ``to_cpu``, their kernels
        finished, marked as used by the default stream."""
        leaves, spec = flatten(value)
        if self.to_cpu:
            leaves = [_download(v) for v in leaves]
        # a blocking event: synchronize() sleeps in the driver, never spins
        done = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()  # the kernels (and copies) are finished
        consumer = torch.cuda.default_stream(self.device)
        for v in leaves:
            if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                v.record_stream(consumer)
        return unflatten(spec, iter(leaves))

    def upload(self, value: Any, stream: torch.cuda.Stream) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.device.type == "cuda":
            value.record_stream(stream)  # the caller may free it while the stream reads it
            return value
        src = value if value.is_pinned() else value.pin_memory()
        return src.to(self.device, non_blocking=True)


def _download(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.device.type != "cuda":
        return value
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)  # complete once the done-event has fired
    return host
