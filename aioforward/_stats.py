"""Statistics of a pool: latency quantiles over a bounded reservoir, and the snapshot type."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .monitor import quantiles

__all__ = ["Latency", "PoolStats", "Reservoir"]

RESERVOIR = 2048  # latency samples kept per kind: enough for a stable p99, bounded memory


@dataclass(frozen=True)
class Latency:
    """Latency quantiles in seconds over the most recent calls (0.0 when none)."""

    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool, from :meth:`Pool.stats`.

    ``workers`` are started and able to take calls; ``busy`` counts workers
    reserved by calls (including calls abandoned by a cancel or timeout whose
    work has not ended yet); ``queued`` calls wait for a worker. ``queue``,
    ``transfer`` and ``compute`` split the latency of a call: waiting for a
    worker, moving data to and from it, running the module. ``restarts`` counts
    workers started to replace one that died or retired.
    """

    workers: int
    busy: int
    queued: int
    completed: int
    failed: int
    cancelled: int
    restarts: int
    queue: Latency
    transfer: Latency
    compute: Latency
    overran: int = 0


class Reservoir:
    """The most recent ``RESERVOIR`` samples of one latency kind."""

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: deque[float] = deque(maxlen=RESERVOIR)

    def add(self, value: float) -> None:
        self.samples.append(value)

    def latency(self) -> Latency:
        return Latency(*quantiles(self.samples))
