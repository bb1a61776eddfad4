"""aioforward: PyTorch forward passes as awaitable futures.

The event loop stays free while models run, and several modules really run at
once, on threads or persistent torch worker processes, under asyncio, uvloop
and trio::

    import aioforward as af

    y1, y2 = await af.run_parallel(encoder_a, encoder_b, x)
    y = await af.forward(model, x, attention_mask=mask)
"""

from ._api import DEFAULT as DEFAULT
from ._api import AsyncModule as AsyncModule
from ._api import default_pool as default_pool
from ._api import forward as forward
from ._api import run_parallel as run_parallel
from ._api import set_default_pool as set_default_pool
from ._call import Call as Call
from ._call import ModuleSpec as ModuleSpec
from ._call import call as call
from ._cpus import usable_cpus as usable_cpus
from ._future import ForwardFuture as ForwardFuture
from ._malloc import keep_freed_memory as keep_freed_memory
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
from .pools._base import Latency as Latency
from .pools._base import MapResult as MapResult
from .pools._base import Pool as Pool
from .pools._base import PoolStats as PoolStats
from .pools.cuda import CudaStreamPool as CudaStreamPool
from .pools.process import ProcessPool as ProcessPool
from .pools.ray import RayPool as RayPool
from .pools.thread import ThreadPool as ThreadPool

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
    "default_pool",
    "forward",
    "keep_freed_memory",
    "run_parallel",
    "set_default_pool",
    "usable_cpus",
)

# Public names report their public home (as trio and httpx do): tracebacks and
# pickles then say ``aioforward.X``, which stays stable when private modules move.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("aioforward.") and hasattr(_obj, "__qualname__"):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):
            pass
del _name, _obj
