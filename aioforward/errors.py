"""The exceptions aioforward raises.

Everything a pool adds on top of the module's own exceptions derives from
:class:`AioforwardError`, so ``except aioforward.AioforwardError`` catches every
failure that is ours and none that is the model's::

    AioforwardError
    ├── PoolClosedError        submit/forward on a pool after close()
    ├── QueueFullError         max_queued reached: back-pressure, try later
    ├── SerializationError     a module, input or result could not cross to/from a worker
    ├── RemoteError            a worker raised an exception that could not be sent back as itself
    ├── DeviceError            no usable device (CUDA absent) or tensors on mismatched devices
    └── BrokenWorkerError      (also concurrent.futures.process.BrokenProcessPool)
        ├── WorkerCrashedError a worker died (signal, exit code, out of memory) during a call
        └── WorkerStartError   a worker could not start (initializer or module factory failed)

Time limits raise the built-in :class:`TimeoutError`; cancellation raises the
event loop's own cancellation exception, always re-raised, never swallowed.
An exception raised by ``module.forward`` keeps its own type and message; the
worker's traceback is chained as ``__cause__`` (a :class:`RemoteTraceback`).
"""

from __future__ import annotations

import os
import pickle
import traceback
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple

__all__ = [
    "AioforwardError",
    "BrokenWorkerError",
    "DeviceError",
    "PoolClosedError",
    "QueueFullError",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "WorkerCrashedError",
    "WorkerStartError",
    "add_note",
    "encode_exception",
]


class AioforwardError(Exception):
    """Base class of every error that aioforward itself raises.

    Example::

        try:
            y = await aioforward.forward(model, x)
        except aioforward.AioforwardError as exc:
            log.warning("pool failure, model untouched: %s", exc)
    """


class PoolClosedError(AioforwardError, RuntimeError):
    """The pool was closed; no new work is accepted.

    It is also a :class:`RuntimeError`, which the standard executors raise on a
    submit after ``shutdown()``, so ``except RuntimeError`` keeps working.
    """


class QueueFullError(AioforwardError):
    """The pool already holds ``max_queued`` waiting calls; the caller should back off."""


class SerializationError(AioforwardError, pickle.PicklingError):
    """A module, an input or a result could not be pickled or unpickled.

    It is also a :class:`pickle.PicklingError`, as the standard executors raise.
    """


class RemoteError(AioforwardError):
    """The module raised an exception that could not be sent back as itself.

    ``type_name`` is the qualified name of the original exception type and
    ``remote_traceback`` the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class DeviceError(AioforwardError):
    """No usable device, or tensors and module on devices that cannot be reconciled."""


class BrokenWorkerError(AioforwardError, BrokenProcessPool):
    """A worker process failed; only the call it was running is affected.

    It is also a :class:`concurrent.futures.process.BrokenProcessPool`, so code
    written for the standard executor keeps catching it (as loky does).
    """


class WorkerCrashedError(BrokenWorkerError):
    """The worker running this call died.

    Attributes: ``module`` (the module's name), ``pid``, ``exitcode`` (negative
    for a signal, as in :attr:`multiprocessing.Process.exitcode`).
    """

    def __init__(
        self, message: str, *, module: str = "", pid: int = 0, exitcode: int | None = None
    ):
        super().__init__(message)
        self.module = module
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_crash, (str(self), self.module, self.pid, self.exitcode))


def _rebuild_crash(message: str, module: str, pid: int, exitcode: int | None) -> WorkerCrashedError:
    return WorkerCrashedError(message, module=module, pid=pid, exitcode=exitcode)


class WorkerStartError(BrokenWorkerError):
    """A worker failed to start: its initializer or a module factory raised."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__`` of re-raised errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class EncodedException(NamedTuple):
    """An exception raised in a worker (process or Ray actor), ready to cross back."""

    blob: bytes | None  # the pickled exception, None when it cannot be rebuilt
    type_name: str
    text: str
    traceback: str
    why: str = ""  # why it cannot be rebuilt, when it cannot

    def rebuild(self) -> BaseException:
        """The original exception (or a :class:`RemoteError`), with the worker's
        traceback as ``__cause__``."""
        cause = RemoteTraceback(self.traceback)
        blob, why = self.blob, self.why
        if blob is not None:
            try:
                exc = pickle.loads(blob)
            except BaseException as e:
                exc, why = None, f"rebuilding it here raised {type(e).__name__}: {e}"
            if isinstance(exc, BaseException):
                exc.__cause__ = cause
                return exc
        err = RemoteError(self.type_name, self.text, self.traceback)
        err.__cause__ = cause
        add_note(err, f"{self.type_name} could not come back as itself: {why}")
        return err


def encode_exception(exc: BaseException) -> EncodedException:
    """Encode ``exc`` (raised in this worker) for :meth:`EncodedException.rebuild` elsewhere.

    Example: ``encode_exception(ValueError("bad")).rebuild()`` is a ``ValueError``.
    """
    tb = f"worker pid {os.getpid()}:\n{''.join(traceback.format_exception(exc))}"
    blob: bytes | None
    why = ""
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # many exceptions pickle but cannot be rebuilt: check here
    except BaseException as e:
        blob, why = None, f"pickling it in the worker raised {type(e).__name__}: {e}"
    module = type(exc).__module__
    if module == "__mp_main__":  # a spawned worker's name for the program's main module
        module = "__main__"
    return EncodedException(blob, f"{module}.{type(exc).__qualname__}", str(exc), tb, why)


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` where Python has it (3.11+); nothing on 3.10.

    Example: ``add_note(err, "raised by module 1 (Tiny) in run_parallel")``.
    """
    add = getattr(exc, "add_note", None)
    if add is not None:
        add(note)
