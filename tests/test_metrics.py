"""aioforward.metrics: every open pool's and Batcher's stats as Prometheus metrics."""

from __future__ import annotations

import importlib
import runpy
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

import aioforward as af
import aioforward.metrics
from aioforward.metrics import AioforwardCollector

from . import models as M

if TYPE_CHECKING:
    from collections.abc import Iterable

    from prometheus_client.metrics_core import Metric

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

POOL_FAMILIES = {
    "aioforward_pool_capacity": "gauge",
    "aioforward_pool_workers": "gauge",
    "aioforward_pool_busy": "gauge",
    "aioforward_pool_queued": "gauge",
    "aioforward_pool_completed": "counter",  # the parser drops the samples' _total
    "aioforward_pool_failed": "counter",
    "aioforward_pool_cancelled": "counter",
    "aioforward_pool_restarts": "counter",
    "aioforward_pool_queue_latency_seconds": "summary",
    "aioforward_pool_transfer_latency_seconds": "summary",
    "aioforward_pool_compute_latency_seconds": "summary",
}
BATCHER_FAMILIES = {
    "aioforward_batcher_batches": "counter",
    "aioforward_batcher_samples": "counter",
    "aioforward_batcher_pending": "gauge",
    "aioforward_batcher_largest_batch": "gauge",
}


def scrape(registry: CollectorRegistry | None = None) -> list[Metric]:
    """What a Prometheus server would read: the text exposition, parsed back."""
    if registry is None:
        registry = CollectorRegistry()
        registry.register(AioforwardCollector())
    return list(text_string_to_metric_families(generate_latest(registry).decode()))


def value(families: Iterable[Metric], sample: str, **labels: str) -> float:
    """The one sample named ``sample`` whose labels include ``labels``."""
    found = [
        s.value
        for f in families
        for s in f.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def label_values(families: Iterable[Metric], sample: str, label: str) -> list[str]:
    return [s.labels[label] for f in families for s in f.samples if s.name == sample]


class TestAioforwardCollector:
    async def test_pool_counts_and_latencies(self) -> None:
        model = M.Tiny()
        async with af.ThreadPool(workers=2, name="metrics-counts") as pool:
            for _ in range(5):
                await pool.forward(model, torch.randn(3, 10))
            with pytest.raises(ValueError, match="boom"):
                await pool.forward(M.Boom(), torch.randn(2))
            fams = scrape()
            types = {f.name: f.type for f in fams}
            assert POOL_FAMILIES.items() <= types.items()
            me = {"pool": "metrics-counts", "kind": "ThreadPool"}
            assert value(fams, "aioforward_pool_capacity", **me) == 2
            assert value(fams, "aioforward_pool_workers", **me) == 2
            assert value(fams, "aioforward_pool_busy", **me) == 0
            assert value(fams, "aioforward_pool_queued", **me) == 0
            assert value(fams, "aioforward_pool_completed_total", **me) == 5
            assert value(fams, "aioforward_pool_failed_total", **me) == 1
            assert value(fams, "aioforward_pool_cancelled_total", **me) == 0
            assert value(fams, "aioforward_pool_restarts_total", **me) == 0
            name = "aioforward_pool_compute_latency_seconds"
            p50, p99, top = (value(fams, name, quantile=q, **me) for q in ("0.5", "0.99", "1"))
            assert 0 < p50 <= p99 <= top
            # quantile samples only: a reservoir of recent calls has no running sum or count
            assert not [s for f in fams for s in f.samples if s.name == f"{name}_count"]
            stats = pool.stats()
            assert top == pytest.approx(stats.compute.max)

    async def test_busy_queued_and_cancelled_are_live(self) -> None:
        gate = M.Gate()
        async with af.ThreadPool(workers=1, name="metrics-live") as pool:
            running = pool.submit(gate, torch.zeros(1))
            queued = pool.submit(gate, torch.zeros(1))
            dropped = pool.submit(gate, torch.zeros(1))
            await anyio.to_thread.run_sync(gate.entered.wait, 10)
            dropped.cancel()
            fams = scrape()
            me = {"pool": "metrics-live"}
            assert value(fams, "aioforward_pool_busy", **me) == 1
            assert value(fams, "aioforward_pool_queued", **me) == 1
            assert value(fams, "aioforward_pool_cancelled_total", **me) == 1
            gate.release.set()
            await running
            await queued
            fams = scrape()
            assert value(fams, "aioforward_pool_busy", **me) == 0
            assert value(fams, "aioforward_pool_queued", **me) == 0
            assert value(fams, "aioforward_pool_completed_total", **me) == 2

    async def test_batcher_series(self) -> None:
        model = torch.nn.Linear(4, 2)
        async with (
            af.ThreadPool(workers=1, name="metrics-batcher") as pool,
            af.Batcher(model, pool, max_batch_size=8) as batcher,
        ):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(batcher, torch.randn(4))
            fams = scrape()
            types = {f.name: f.type for f in fams}
            assert BATCHER_FAMILIES.items() <= types.items()
            me = {"batcher": "Batcher(Linear)"}
            batches = value(fams, "aioforward_batcher_batches_total", **me)
            assert value(fams, "aioforward_batcher_samples_total", **me) == 12
            assert 2 <= batches <= 12
            assert 1 <= value(fams, "aioforward_batcher_largest_batch", **me) <= 8
            assert value(fams, "aioforward_batcher_pending", **me) == 0
            # each batch is one call of the pool
            assert value(fams, "aioforward_pool_completed_total", pool="metrics-batcher") == batches

    async def test_closed_pools_and_batchers_disappear(self) -> None:
        pool = af.ThreadPool(workers=1, name="metrics-closing")
        batcher = af.Batcher(torch.nn.Linear(4, 2), pool)
        fams = scrape()
        assert "metrics-closing" in label_values(fams, "aioforward_pool_workers", "pool")
        assert "Batcher(Linear)" in label_values(fams, "aioforward_batcher_pending", "batcher")
        await batcher.aclose()
        await pool.aclose()
        assert batcher.closed and pool.closed
        fams = scrape()
        assert "metrics-closing" not in label_values(fams, "aioforward_pool_workers", "pool")
        assert "Batcher(Linear)" not in label_values(fams, "aioforward_batcher_pending", "batcher")

    async def test_pools_with_one_name_get_distinct_labels(self) -> None:
        # Prometheus rejects a whole scrape that repeats a series.
        async with (
            af.ThreadPool(workers=1, name="metrics-twin") as a,
            af.ThreadPool(workers=2, name="metrics-twin") as b,
            af.ThreadPool(workers=1, name="metrics-single"),
        ):
            fams = scrape()
            names = label_values(fams, "aioforward_pool_capacity", "pool")
            twins = [n for n in names if n.startswith("metrics-twin")]
            assert len(twins) == len(set(twins)) == 2
            assert all(n.startswith("metrics-twin#") for n in twins)
            assert "metrics-single" in names
            capacities = sorted(value(fams, "aioforward_pool_capacity", pool=n) for n in twins)
            assert capacities == [a.workers, b.workers]

    def test_describe_names_every_family_without_samples(self) -> None:
        described = list(AioforwardCollector().describe())
        assert {m.name: m.type for m in described} == POOL_FAMILIES | BATCHER_FAMILIES
        assert all(not m.samples for m in described)

    def test_openmetrics_exposition_parses_strictly(self) -> None:
        """The summaries' quantile-only samples and the counters' names are valid OpenMetrics."""
        with af.ThreadPool(workers=1, name="metrics-om") as pool:
            pool.submit(M.Tiny(), torch.randn(1, 10)).result()
            registry = CollectorRegistry()
            registry.register(AioforwardCollector())
            text = openmetrics.generate_latest(registry).decode()
        fams = list(openmetrics_parser.text_string_to_metric_families(text))
        assert value(fams, "aioforward_pool_completed_total", pool="metrics-om") == 1
        assert "# UNIT aioforward_pool_compute_latency_seconds seconds" in text

    def test_process_pool_kind_and_transfer(self) -> None:
        with af.ProcessPool(workers=1, name="metrics-process") as pool:
            pool.submit(M.Tiny(), torch.randn(4, 10)).result()
            fams = scrape()
        me = {"pool": "metrics-process", "kind": "ProcessPool"}
        assert value(fams, "aioforward_pool_completed_total", **me) == 1
        assert value(fams, "aioforward_pool_workers", **me) == 1
        assert value(fams, "aioforward_pool_transfer_latency_seconds", quantile="1", **me) >= 0
        assert value(fams, "aioforward_pool_compute_latency_seconds", quantile="1", **me) > 0


class TestRegister:
    def test_idempotent_per_registry(self) -> None:
        registry = CollectorRegistry()
        first = aioforward.metrics.register(registry)
        assert aioforward.metrics.register(registry) is first
        assert aioforward.metrics.register(CollectorRegistry()) is not first
        with af.ThreadPool(workers=1, name="metrics-register"):
            fams = scrape(registry)
        assert value(fams, "aioforward_pool_capacity", pool="metrics-register") == 1

    def test_unregister_then_register_again(self) -> None:
        registry = CollectorRegistry()
        aioforward.metrics.unregister(registry)  # not registered: nothing happens
        aioforward.metrics.register(registry)
        aioforward.metrics.unregister(registry)
        assert not scrape(registry)
        aioforward.metrics.register(registry)
        assert {f.name for f in registry.collect()} >= set(POOL_FAMILIES)

    def test_default_registry(self) -> None:
        import prometheus_client

        collector = aioforward.metrics.register()
        assert aioforward.metrics.register(prometheus_client.REGISTRY) is collector
        with af.ThreadPool(workers=1, name="metrics-default"):
            fams = scrape(prometheus_client.REGISTRY)
        assert value(fams, "aioforward_pool_capacity", pool="metrics-default") == 1


class TestImport:
    def test_top_level_import_does_not_load_prometheus_client(self) -> None:
        code = "import sys, aioforward; assert 'prometheus_client' not in sys.modules"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    def test_missing_package_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
        monkeypatch.delitem(sys.modules, "aioforward.metrics")
        with pytest.raises(ImportError, match=r"pip install 'aioforward\[prometheus\]'"):
            importlib.import_module("aioforward.metrics")


class TestMetricsEndpoint:
    """The example app's /metrics, scraped over HTTP (in-process ASGI) as Prometheus would."""

    async def test_example_serves_metrics(self) -> None:
        mod = runpy.run_path(str(EXAMPLES / "metrics_app.py"))
        app = mod["app"]
        transport = httpx.ASGITransport(app=app)
        calls = 10
        async with (
            app.router.lifespan_context(app),  # ASGITransport does not run the lifespan
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):

            async def predict() -> None:
                r = await client.post("/predict", json={"features": [0.1] * 64})
                assert r.status_code == 200
                assert 0 <= r.json()["label"] < 10

            async with anyio.create_task_group() as tg:
                for _ in range(calls):
                    tg.start_soon(predict)
            r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        fams = list(text_string_to_metric_families(r.text))
        pool = {"pool": "classifier", "kind": "ThreadPool"}
        batcher = {"batcher": "Batcher(Sequential)"}
        batches = value(fams, "aioforward_batcher_batches_total", **batcher)
        assert value(fams, "aioforward_batcher_samples_total", **batcher) == calls
        assert 1 <= batches <= calls
        assert value(fams, "aioforward_pool_completed_total", **pool) == batches
        assert value(fams, "aioforward_pool_workers", **pool) == 2
        assert value(fams, "aioforward_pool_capacity", **pool) == 2
        assert value(fams, "aioforward_pool_failed_total", **pool) == 0
        assert value(fams, "aioforward_pool_busy", **pool) == 0
        assert value(fams, "aioforward_pool_queued", **pool) == 0
        for kind in ("queue", "transfer", "compute"):
            name = f"aioforward_pool_{kind}_latency_seconds"
            p50, p99, top = (value(fams, name, quantile=q, **pool) for q in ("0.5", "0.99", "1"))
            assert 0 <= p50 <= p99 <= top
        assert value(fams, "aioforward_pool_compute_latency_seconds", quantile="1", **pool) > 0
