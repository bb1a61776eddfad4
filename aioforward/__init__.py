"""aioforward: PyTorch forward passes as awaitable futures.

The event loop stays free while models run, and several modules really run at
once, on threads or persistent torch worker processes, under asyncio, uvloop
and trio::

    import aioforward as af

    y1, y2 = await af.run_parallel(encoder_a, encoder_b, x)
    y = await af.forward(model, x, attention_mask=mask)
"""

import typing as _typing

from ._api import DEFAULT as DEFAULT
from ._api import AsyncModule as AsyncModule
from ._api import default_pool as default_pool
from ._api import forward as forward
from ._api import run_parallel as run_parallel
from ._api import set_default_pool as set_default_pool
from ._api import stream as stream
from ._call import Call as Call
from ._call import ModuleSpec as ModuleSpec
from ._call import call as call
from ._cancel import check_cancelled as check_cancelled
from ._cpus import usable_cpus as usable_cpus
from ._future import ForwardFuture as ForwardFuture
from ._malloc import keep_freed_memory as keep_freed_memory
from ._stats import Latency as Latency
from ._stats import PoolStats as PoolStats
from ._stream import ForwardStream as ForwardStream
from .batching import Batcher as Batcher
from .batching import BatcherStats as BatcherStats
from .errors import AioforwardError as AioforwardError
from .errors import BrokenWorkerError as BrokenWorkerError
from .errors import DeviceError as DeviceError
from .errors import PoolClosedError as PoolClosedError
from .errors import QueueFullError as QueueFullError
from .errors import RemoteError as RemoteError
from .errors import RemoteTraceback as RemoteTraceback
from .errors import SerializationError as SerializationError
from .errors import WorkerCrashedError as WorkerCrashedError
from .errors import WorkerStartError as WorkerStartError
from .monitor import LagStats as LagStats
from .monitor import LoopLagMonitor as LoopLagMonitor
from .pools._base import Pool as Pool
from .pools._map import MapResult as MapResult
from .pools.process import ProcessPool as ProcessPool
from .pools.thread import ThreadPool as ThreadPool

if _typing.TYPE_CHECKING:
    from .pools.cuda import CudaStreamPool as CudaStreamPool
    from .pools.ray import RayPool as RayPool

__version__ = "0.1.0"

__all__ = (
    "DEFAULT",
    "AioforwardError",
    "AsyncModule",
    "Batcher",
    "BatcherStats",
    "BrokenWorkerError",
    "Call",
    "CudaStreamPool",
    "DeviceError",
    "ForwardFuture",
    "ForwardStream",
    "LagStats",
    "Latency",
    "LoopLagMonitor",
    "MapResult",
    "ModuleSpec",
    "Pool",
    "PoolClosedError",
    "PoolStats",
    "ProcessPool",
    "QueueFullError",
    "RayPool",
    "RemoteError",
    "RemoteTraceback",
    "SerializationError",
    "ThreadPool",
    "WorkerCrashedError",
    "WorkerStartError",
    "call",
    "check_cancelled",
    "default_pool",
    "forward",
    "keep_freed_memory",
    "run_parallel",
    "set_default_pool",
    "stream",
    "usable_cpus",
)

# Loaded on first use, as anyio loads its backends: importing aioforward imports neither the
# CUDA pool's machinery nor Ray (an optional extra). Everything else loads with the package,
# at import time: a first ``af.forward(...)`` must not stall the event loop importing modules.
_OPTIONAL = {"CudaStreamPool": ".pools.cuda", "RayPool": ".pools.ray"}


def _public_home(obj: object) -> None:
    """Public names report their public home (as trio and httpx do): tracebacks and
    pickles then say ``aioforward.X``, which stays stable when private modules move."""
    if getattr(obj, "__module__", "").startswith("aioforward.") and hasattr(obj, "__qualname__"):
        try:
            obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass


def __getattr__(name: str) -> object:
    if name not in _OPTIONAL:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    obj = getattr(importlib.import_module(_OPTIONAL[name], __name__), name)
    _public_home(obj)
    globals()[name] = obj
    return obj


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


for _name in __all__:
    if _name not in _OPTIONAL:
        _public_home(globals()[_name])
del _name
