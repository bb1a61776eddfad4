"""Prometheus metrics for every open pool and Batcher (the optional extra ``prometheus``).

``import aioforward.metrics`` is the entry; ``import aioforward`` alone never
imports ``prometheus_client``. Register the collector once, then serve the
registry the way the application already serves metrics::

    import aioforward.metrics
    from prometheus_client import generate_latest

    aioforward.metrics.register()            # the default registry; idempotent
    body = generate_latest()                 # e.g. in a /metrics route

At each scrape the collector reads ``stats()`` of every pool and every
:class:`~aioforward.Batcher` that exists and is not closed (they register
themselves, weakly, when constructed), so there is nothing to update by hand
and nothing kept alive. A closed pool's series disappear.

Exposed families (pools are labelled ``pool`` = the pool's name and ``kind`` =
its class; Batchers ``batcher`` = ``Batcher(<module>)``; where two open objects
share a name, ``#<n>`` is appended to tell them apart)::

    aioforward_pool_capacity                      gauge    calls the pool runs at once
    aioforward_pool_workers                       gauge    workers up now
    aioforward_pool_busy                          gauge    slots running a call
    aioforward_pool_queued                        gauge    calls waiting for a slot
    aioforward_pool_completed_total               counter
    aioforward_pool_failed_total                  counter
    aioforward_pool_cancelled_total               counter
    aioforward_pool_restarts_total                counter  workers replaced
    aioforward_pool_queue_latency_seconds         summary  quantile 0.5, 0.99, 1 (= max)
    aioforward_pool_transfer_latency_seconds      summary
    aioforward_pool_compute_latency_seconds       summary
    aioforward_batcher_batches_total              counter  batched forward passes
    aioforward_batcher_samples_total              counter  samples in them
    aioforward_batcher_pending                    gauge    samples waiting for a batch
    aioforward_batcher_largest_batch              gauge

The latency summaries carry quantile samples only: the pool keeps the most
recent calls' latencies, not a running sum, so there is no ``_sum`` or
``_count`` (``aioforward_pool_completed_total`` counts the calls). Before the
first call the quantiles read 0, as in :class:`~aioforward.PoolStats`.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
    from prometheus_client.registry import Collector
    from prometheus_client.samples import Sample
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "aioforward.metrics needs prometheus_client; install the extra with "
        "pip install 'aioforward[prometheus]'"
    ) from exc

from . import _registry

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from .batching import Batcher
    from .pools._base import Latency, Pool

__all__ = ["AioforwardCollector", "register", "unregister"]

# (suffix, help): one table per kind of family, so collect() and describe() agree.
_POOL_GAUGES = (
    ("capacity", "Calls the pool runs at once when all its workers are up."),
    ("workers", "Workers up now (lower than capacity while workers start or restart)."),
    ("busy", "Slots running a call, including abandoned calls whose work has not ended."),
    ("queued", "Calls waiting for a free slot."),
)
_POOL_COUNTERS = (
    ("completed", "Calls that returned a result."),
    ("failed", "Calls that raised."),
    ("cancelled", "Calls cancelled or timed out."),
    ("restarts", "Workers replaced after a crash, a kill or a timeout."),
)
_POOL_LATENCIES = (
    ("queue", "Time a call waited for a slot, over the most recent calls."),
    ("transfer", "Time spent moving a call's data to and from its worker, recent calls."),
    ("compute", "Time the module ran, over the most recent calls."),
)
_BATCHER_COUNTERS = (
    ("batches", "Batched forward passes submitted to the pool."),
    ("samples", "Samples in those batched forward passes."),
)
_BATCHER_GAUGES = (
    ("pending", "Samples waiting for their batch to run."),
    ("largest_batch", "The largest batch so far."),
)
_QUANTILES = (("0.5", "p50"), ("0.99", "p99"), ("1", "max"))  # quantile label, Latency field
_POOL_LABELS = ("pool", "kind")
_BATCHER_LABELS = ("batcher",)


class AioforwardCollector(Collector):
    """A ``prometheus_client`` collector over every open pool's and Batcher's ``stats()``.

    Register it on any registry (or use :func:`register`, which does it once)::

        from prometheus_client import CollectorRegistry, generate_latest
        from aioforward.metrics import AioforwardCollector

        registry = CollectorRegistry()
        registry.register(AioforwardCollector())
        print(generate_latest(registry).decode())

    It holds no state: each scrape reads the pools and Batchers open at that
    moment, in the thread that scrapes. Reading a pool's stats takes its lock
    for a moment and sorts its recent latencies (a few thousand floats).
    """

    def collect(self) -> Iterator[Metric]:
        """The families with one sample set per open pool and Batcher (called by the registry).

        Example: ``{m.name for m in AioforwardCollector().collect()}``.
        """
        fam = _Families()
        for label, kind, pool in _labelled(_registry.open_pools()):
            fam.add_pool((label, kind), pool)
        for label, _kind, batcher in _labelled(_registry.open_batchers()):
            fam.add_batcher((label,), batcher)
        return iter(fam.all())

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so a registry knows the names before any pool exists.

        Example: ``[m.name for m in AioforwardCollector().describe()]``.
        """
        return iter(_Families().all())


class _Families:
    """One scrape's metric families, filled object by object."""

    def __init__(self) -> None:
        self.pool: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for suffix, doc in _POOL_GAUGES:
            self.pool[suffix] = GaugeMetricFamily(
                f"aioforward_pool_{suffix}", doc, labels=_POOL_LABELS
            )
        for suffix, doc in _POOL_COUNTERS:
            self.pool[suffix] = CounterMetricFamily(
                f"aioforward_pool_{suffix}", doc, labels=_POOL_LABELS
            )
        self.latency = {
            suffix: SummaryMetricFamily(
                f"aioforward_pool_{suffix}_latency", doc, labels=_POOL_LABELS, unit="seconds"
            )
            for suffix, doc in _POOL_LATENCIES
        }
        self.batcher: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for suffix, doc in _BATCHER_COUNTERS:
            self.batcher[suffix] = CounterMetricFamily(
                f"aioforward_batcher_{suffix}", doc, labels=_BATCHER_LABELS
            )
        for suffix, doc in _BATCHER_GAUGES:
            self.batcher[suffix] = GaugeMetricFamily(
                f"aioforward_batcher_{suffix}", doc, labels=_BATCHER_LABELS
            )

    def all(self) -> list[Metric]:
        return [*self.pool.values(), *self.latency.values(), *self.batcher.values()]

    def add_pool(self, labels: tuple[str, str], pool: Pool) -> None:
        s = pool.stats()
        values = {
            "capacity": pool.workers,
            "workers": s.workers,
            "busy": s.busy,
            "queued": s.queued,
            "completed": s.completed,
            "failed": s.failed,
            "cancelled": s.cancelled,
            "restarts": s.restarts,
        }
        for suffix, value in values.items():
            self.pool[suffix].add_metric(labels, value)
        named = dict(zip(_POOL_LABELS, labels, strict=True))
        for suffix, latency in (
            ("queue", s.queue),
            ("transfer", s.transfer),
            ("compute", s.compute),
        ):
            _add_quantiles(self.latency[suffix], named, latency)

    def add_batcher(self, labels: tuple[str], batcher: Batcher) -> None:
        s = batcher.stats()
        values = {
            "batches": s.batches,
            "samples": s.samples,
            "pending": s.pending,
            "largest_batch": s.largest,
        }
        for suffix, value in values.items():
            self.batcher[suffix].add_metric(labels, value)


def _add_quantiles(family: SummaryMetricFamily, labels: dict[str, str], latency: Latency) -> None:
    """Quantile samples of a summary: valid exposition, though ``SummaryMetricFamily.add_metric``
    only writes ``_count``/``_sum`` (which a pool's recent-calls reservoir cannot give)."""
    for quantile, field in _QUANTILES:
        value = float(getattr(latency, field))
        family.samples.append(Sample(family.name, {**labels, "quantile": quantile}, value))


def _labelled(objs: Iterable[Any]) -> list[tuple[str, str, Any]]:
    """(name label, class name, object); a name shared by several objects gets ``#<serial>``.

    Two series with the same labels would make Prometheus reject the whole scrape.
    """
    objs = list(objs)
    names = [str(getattr(o, "_name", type(o).__name__)) for o in objs]
    seen = Counter(names)
    return [
        (name if seen[name] == 1 else f"{name}#{_registry.serial(o)}", type(o).__name__, o)
        for name, o in zip(names, objs, strict=True)
    ]


_lock = threading.Lock()
_registered: weakref.WeakKeyDictionary[CollectorRegistry, AioforwardCollector] = (
    weakref.WeakKeyDictionary()
)


def register(registry: CollectorRegistry | None = None) -> AioforwardCollector:
    """Register the aioforward collector on ``registry`` (default: ``prometheus_client.REGISTRY``).

    Idempotent: calling it again for the same registry returns the collector
    already there, so a module-level call in an app that is imported twice is
    harmless::

        import aioforward.metrics
        from prometheus_client import make_asgi_app

        aioforward.metrics.register()
        metrics_app = make_asgi_app()       # serves the pools' and Batchers' stats
    """
    if registry is None:
        registry = REGISTRY
    with _lock:
        collector = _registered.get(registry)
        if collector is None:
            collector = AioforwardCollector()
            registry.register(collector)
            _registered[registry] = collector
        return collector


def unregister(registry: CollectorRegistry | None = None) -> None:
    """Remove what :func:`register` added to ``registry``; nothing if it was not registered.

    Example: ``aioforward.metrics.unregister()`` (the default registry).
    """
    if registry is None:
        registry = REGISTRY
    with _lock:
        collector = _registered.pop(registry, None)
        if collector is not None:
            registry.unregister(collector)
