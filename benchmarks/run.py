"""aioforward's benchmark suite: every pool against the alternatives, in one run.

    python -m aioforward bench [--quick] [--out DIR]

Writes DIR/results.json (every raw figure), DIR/report.md (the table of targets)
and DIR/report.png (overheads, speed-ups, loop lag). Each figure is a median over
repeats after a warm-up; each target is a ratio against a baseline measured in
the same run, since absolute times drift on shared machines.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_process
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import aioforward as af
from aioforward import _models

R: dict[str, Any] = {}  # name -> {"median": s, "min": s, "max": s, "n": int}


def record(name: str, samples: list[float]) -> float:
    R[name] = {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }
    return float(R[name]["median"])


async def per_call(name: str, fn: Callable[[], Awaitable[Any]], n: int) -> float:
    """Many short calls: a longer warm-up (10%) before timing."""
    return await rounds(name, fn, n, warmup=max(5, n // 10))


async def rounds(name: str, fn: Callable[[], Awaitable[Any]], n: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        await fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        ts.append(time.perf_counter() - t0)
    return record(name, ts)


async def lag_during(name: str, fn: Callable[[], Awaitable[Any]], n: int) -> None:
    await fn()
    async with af.LoopLagMonitor() as lag:
        for _ in range(n):
            await fn()
            await asyncio.sleep(0.002)  # a blocking round shows up as one long late beat
    s = lag.stats()
    R[name] = {"p50": s.p50, "p99": s.p99, "max": s.max, "samples": s.samples}


# ---------------------------------------------------------------- alternatives
_pe_module: torch.nn.Module | None = None


def _pe_init(kind: str) -> None:
    global _pe_module
    torch.set_num_threads(1)
    torch.manual_seed(0)
    _pe_module = getattr(_models, kind)()


def _pe_run(x: Any) -> Any:
    assert _pe_module is not None
    with torch.inference_mode():
        return _pe_module(x)


def _rebuild_and_run(kind: str, x: Any, q: Any) -> None:  # the seed approach
    torch.manual_seed(0)
    m = getattr(_models, kind)()
    with torch.inference_mode():
        q.put(m(x).numpy())  # a tensor would go by fd, gone once this process exits


def _seed_call(kind: str, x: Any) -> Any:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_rebuild_and_run, args=(kind, x, q))
    p.start()
    out = q.get()
    p.join()
    return out


def _direct(m: torch.nn.Module, x: Any) -> Any:
    with torch.inference_mode():
        return m(x)


# ---------------------------------------------------------------- scenarios
async def overhead(loop_name: str, quick: bool, advance: Callable[[], None]) -> None:
    """Per-call cost of a tiny module, every approach open at once and timed in
    interleaved blocks of 50 calls."""
    n = 300 if quick else 2000
    m, x = _models.tiny(), _models.INPUTS["tiny"]()
    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")
    async with af.ThreadPool(workers=2) as tp, af.ProcessPool(workers=2) as pp:
        await pp.warmup(m, example=x)
        with concurrent.futures.ProcessPoolExecutor(
            2, mp_context=spawn, initializer=_pe_init, initargs=("tiny",)
        ) as ex:
            p = f"{loop_name}/tiny/"
            await interleaved(
                {
                    p + "direct": (lambda: _async(_direct, m, x), 1),
                    p + "to_thread": (lambda: asyncio.to_thread(_direct, m, x), 1),
                    p + "ThreadPool": (lambda: tp.forward(m, x), 1),
                    p + "ProcessPool": (lambda: pp.forward(m, x), 1),
                    p + "ProcessPoolExecutor": (lambda: loop.run_in_executor(ex, _pe_run, x), 1),
                    p + "anyio.to_process": (lambda: anyio.to_process.run_sync(_direct, m, x), 1),
                },
                n // 50,
                block=50,
            )
    advance()


async def _async(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


async def interleaved(
    variants: dict[str, tuple[Callable[[], Awaitable[Any]], int]], n: int, block: int = 1
) -> None:
    """Time the variants round-robin (``block`` calls per turn, ``n`` turns), each at its
    torch thread count, after one warm-up turn each: drift on a shared machine then hits
    every variant alike, so their ratios hold even when absolute times move."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for warm in [True] + [False] * n:
        for name, (fn, threads) in variants.items():
            torch.set_num_threads(threads)
            for _ in range(block):
                t0 = time.perf_counter()
                await fn()
                if not warm:
                    samples[name].append(time.perf_counter() - t0)
    torch.set_num_threads(1)
    for name, ts in samples.items():
        record(name, ts)


async def parallel(kind: str, quick: bool, advance: Callable[[], None]) -> None:
    n = 5 if quick else 15
    torch.manual_seed(0)
    m1, m2 = getattr(_models, kind)(), getattr(_models, kind)()
    x = _models.INPUTS[kind]()
    cpus = af.usable_cpus()

    async def serial() -> None:
        _direct(m1, x)
        _direct(m2, x)

    async with af.ThreadPool(workers=2) as tp, af.ProcessPool(workers=2) as pp:
        await pp.warmup(m1, m2, example=x)
        await interleaved(
            {
                f"{kind}/serial-1-thread": (serial, 1),
                f"{kind}/direct-default-threads": (serial, cpus),
                f"{kind}/ThreadPool": (lambda: tp.run_parallel(m1, m2, x), 1),
                f"{kind}/ProcessPool": (lambda: pp.run_parallel(m1, m2, x), 1),
            },
            n,
        )
        advance()
        torch.set_num_threads(cpus)
        await lag_during(f"lag/{kind}/direct", serial, n)
        torch.set_num_threads(1)
        await lag_during(f"lag/{kind}/ThreadPool-both-cores", lambda: tp.run_parallel(m1, m2, x), n)
        await lag_during(
            f"lag/{kind}/ProcessPool-both-cores", lambda: pp.run_parallel(m1, m2, x), n
        )
        await lag_during(f"lag/{kind}/ProcessPool-one-call", lambda: pp.forward(m1, x), n)
    advance()


async def big_transfer(quick: bool, advance: Callable[[], None]) -> None:
    n = 5 if quick else 15
    big = torch.randn(16 * 1024 * 1024)  # 64 MiB
    ident = torch.nn.Identity()

    async def clone() -> None:
        big.clone()

    async with af.ProcessPool(workers=1) as pp:
        await interleaved(
            {
                "64MiB/clone": (clone, 1),
                "64MiB/ProcessPool-round-trip": (lambda: pp.forward(ident, big), 1),
            },
            n,
        )
    advance()


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def startup(quick: bool, advance: Callable[[], None]) -> None:
    m, x = _models.mlp(), _models.INPUTS["mlp"]()
    ts = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        async with af.ProcessPool(workers=2) as pp:
            await pp.warmup(m, example=x)
            ts.append(time.perf_counter() - t0)
    record("start/ProcessPool-2-workers-module-loaded", ts)
    advance()


async def throughput(quick: bool, advance: Callable[[], None]) -> None:
    m, x = _models.tiny(), _models.INPUTS["tiny"]()
    callers, each = 32, (10 if quick else 50)
    for name, make in [
        ("ThreadPool", lambda: af.ThreadPool(workers=2)),
        ("ProcessPool", lambda: af.ProcessPool(workers=2)),
    ]:
        async with make() as pool:
            await pool.warmup(m, example=x)

            async def caller(pool: af.Pool = pool) -> None:
                for _ in range(each):
                    await pool.forward(m, x)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            R[f"throughput/{name}"] = {"calls_per_s": callers * each / (time.perf_counter() - t0)}
        advance()


async def batching(quick: bool, advance: Callable[[], None]) -> None:
    """1,000 concurrent single-sample requests to mlp, batched and not, on each pool; then
    the latency a Batcher adds to a lone request (low load)."""
    m, x = _models.mlp(), torch.randn(1024)
    n_requests, reps, lone = 1000, (1 if quick else 3), (30 if quick else 200)

    async def burst(fn: Callable[[], Awaitable[Any]]) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n_requests):
                tg.start_soon(fn)

    for kind, make in [
        ("ThreadPool", lambda: af.ThreadPool(workers=2)),
        ("ProcessPool", lambda: af.ProcessPool(workers=2)),
    ]:
        async with make() as pool, af.Batcher(m, pool, max_batch_size=64) as b:
            await pool.warmup(m, example=x)
            variants: dict[str, Callable[[], Awaitable[Any]]] = {
                "unbatched": lambda pool=pool: pool.forward(m, x),
                "Batcher": lambda b=b: b(x),
            }
            rates: dict[str, list[float]] = {name: [] for name in variants}
            for rep in range(reps + 1):  # the first round warms up
                for name, fn in variants.items():
                    t0 = time.perf_counter()
                    await burst(fn)
                    if rep:
                        rates[name].append(n_requests / (time.perf_counter() - t0))
            for name, rs in rates.items():
                R[f"batch/{kind}/{name}"] = {"calls_per_s": statistics.median(rs)}
            s = b.stats()
            R[f"batch/{kind}/Batcher"]["mean_batch"] = s.samples / s.batches
            if kind == "ThreadPool":
                await interleaved(
                    {
                        "batch/lone/forward": (lambda pool=pool: pool.forward(m, x), 1),
                        "batch/lone/Batcher": (lambda b=b: b(x), 1),
                    },
                    lone,
                )
        advance()


async def cuda_streams(quick: bool, advance: Callable[[], None]) -> None:
    """Two small-kernel modules: one after the other on the default stream vs overlapped."""
    from aioforward.pools.cuda import cuda_unavailable_reason

    if cuda_unavailable_reason() is not None:
        advance()
        return
    m1, m2 = _models.mlp(256, 8).cuda(), _models.mlp(256, 8).cuda()
    x = torch.randn(32, 256, device="cuda")

    async def serial() -> None:
        with torch.inference_mode():
            m1(x)
            m2(x)
        torch.cuda.synchronize()

    async with af.CudaStreamPool(workers=4) as pool:
        await interleaved(
            {
                "cuda/serial-default-stream": (serial, 1),
                "cuda/CudaStreamPool": (lambda: pool.run_parallel(m1, m2, x), 1),
            },
            20 if quick else 100,
        )
        await lag_during("lag/cuda/CudaStreamPool", lambda: pool.run_parallel(m1, m2, x), 50)
    advance()


def _pe_pid(x: Any) -> int:
    _pe_run(x)
    time.sleep(3)  # outlast a worker start, so the executor starts a second worker
    return os.getpid()


async def memory(quick: bool, advance: Callable[[], None]) -> None:
    """Memory that 2 workers add to serve one ~200 MB module.

    ProcessPool: the growth of the workers' unique memory (USS) when the module is loaded
    and run on each, plus the shared segment once. ProcessPoolExecutor with the module built
    in each worker's initializer: its workers' USS minus that of the same executor built
    with the tiny module (a copy per worker)."""
    import psutil

    def uss(pids: list[int]) -> int:
        return sum(psutil.Process(p).memory_full_info().uss for p in pids)

    torch.manual_seed(0)
    m = _models.wide(200)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    x = torch.randn(1, m[0].in_features)
    async with af.ProcessPool(workers=2) as pp:
        await pp.wait_ready()
        base = uss(pp.worker_pids())
        await pp.warmup(m, example=x)
        added = uss(pp.worker_pids()) - base + size  # + the one shared copy
    R["memory/ProcessPool"] = {"module": size, "workers_base": base, "added": added}
    advance()
    loop = asyncio.get_running_loop()
    totals = {}
    for kind, arg in (("tiny", _models.INPUTS["tiny"]()), ("wide", x)):
        with concurrent.futures.ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_pe_init,
            initargs=(kind,),
        ) as ex:
            pids = await asyncio.gather(*(loop.run_in_executor(ex, _pe_pid, arg) for _ in range(2)))
            totals[kind] = uss(sorted(set(pids)))
    R["memory/ProcessPoolExecutor"] = {"module": size, "added": totals["wide"] - totals["tiny"]}
    advance()


async def ray_actors(quick: bool, advance: Callable[[], None]) -> None:
    """Ray actors, one per module, when ray is installed (an optional extra)."""
    try:
        import ray
    except ImportError:
        return

    class Actor:
        def __init__(self, kind: str) -> None:
            torch.set_num_threads(1)
            torch.manual_seed(0)
            self.m = getattr(_models, kind)()

        def forward(self, x: Any) -> Any:
            with torch.inference_mode():
                return self.m(x)

    ray.init(num_cpus=af.usable_cpus(), include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(Actor)
        tiny = remote.remote("tiny")
        x = _models.INPUTS["tiny"]()
        await per_call(
            "asyncio/tiny/ray-actor", lambda: tiny.forward.remote(x), 100 if quick else 500
        )
        ray.kill(tiny)
        a, b = remote.remote("mlp"), remote.remote("mlp")
        xm = _models.INPUTS["mlp"]()

        async def both() -> None:
            await asyncio.gather(a.forward.remote(xm), b.forward.remote(xm))

        await rounds("mlp/Ray", both, 3 if quick else 10)
        ray.kill(a)
        ray.kill(b)
        from aioforward.pools.ray import RayPool

        mt, m1, m2 = _models.tiny(), _models.mlp(), _models.mlp()
        async with RayPool(workers=2) as rp:
            await rp.warmup(mt, example=x)
            await rp.warmup(m1, m2, example=xm)
            await per_call("asyncio/tiny/RayPool", lambda: rp.forward(mt, x), 100 if quick else 500)
            await rounds("mlp/RayPool", lambda: rp.run_parallel(m1, m2, xm), 3 if quick else 10)
    finally:
        ray.shutdown()
    advance()


async def seed(quick: bool, advance: Callable[[], None]) -> None:
    x = _models.INPUTS["tiny"]()
    ts = [_timed(lambda: _seed_call("tiny", x)) for _ in range(2 if quick else 3)]
    record("asyncio/tiny/seed-process-per-call", ts)
    advance()


# ---------------------------------------------------------------- report
def ratio(a: str, b: str, key: str = "median") -> float:
    return float(R[a][key]) / float(R[b][key])


def targets() -> list[tuple[str, str, str, bool | None]]:
    rows = []

    def add(name: str, target: str, value: str, ok: bool | None) -> None:
        # ok: True / False against a target; None for comparison rows and what is not built
        rows.append((name, target, value, ok))

    for loop in ("asyncio", "uvloop"):
        direct = R[f"{loop}/tiny/direct"]["median"]
        tp = R[f"{loop}/tiny/ThreadPool"]["median"] - direct
        tt = R[f"{loop}/tiny/to_thread"]["median"] - direct
        add(
            f"ThreadPool added per call, tiny ({loop})",
            "<= 30 us (uvloop) and <= 0.8x to_thread",
            f"{tp * 1e6:.0f} us = {tp / tt:.2f}x to_thread ({tt * 1e6:.0f} us)",
            tp / tt <= 0.8 and (loop != "uvloop" or tp <= 30e-6),
        )
    pp = R["asyncio/tiny/ProcessPool"]["median"]
    add(
        "ProcessPool round trip, tiny (asyncio)",
        "<= 100 us; beat anyio.to_process",
        f"{pp * 1e6:.0f} us; to_process {R['asyncio/tiny/anyio.to_process']['median'] * 1e6:.0f} us,"
        f" ProcessPoolExecutor {R['asyncio/tiny/ProcessPoolExecutor']['median'] * 1e6:.0f} us",
        pp <= 100e-6,
    )
    seed_ratio = R["asyncio/tiny/seed-process-per-call"]["median"] / pp
    add(
        "seed approach / ProcessPool per call",
        ">= 10,000x",
        f"{seed_ratio:,.0f}x",
        seed_ratio >= 10_000,
    )
    for kind in ("mlp", "conv", "transformer"):
        for pool in ("ThreadPool", "ProcessPool"):
            s = ratio(f"{kind}/serial-1-thread", f"{kind}/{pool}")
            d = ratio(f"{kind}/direct-default-threads", f"{kind}/{pool}")
            if kind == "mlp":
                add(
                    f"run_parallel 2 x mlp, {pool} vs serial 1 thread",
                    ">= 1.85x",
                    f"{s:.2f}x",
                    s >= 1.85,
                )
            add(
                f"run_parallel 2 x {kind}, {pool} vs direct default threads",
                ">= 0.95x",
                f"{d:.2f}x",
                d >= 0.95,
            )
    rt = ratio("64MiB/ProcessPool-round-trip", "64MiB/clone")
    add("64 MiB round trip / one clone", "<= 4x", f"{rt:.2f}x", rt <= 4)
    for pool in ("ThreadPool", "ProcessPool"):
        p99 = R[f"lag/mlp/{pool}-both-cores"]["p99"]
        add(
            f"heartbeat p99, both cores computing ({pool})",
            "<= 5 ms",
            f"{p99 * 1e3:.2f} ms",
            p99 <= 5e-3,
        )
    p99 = R["lag/mlp/ProcessPool-one-call"]["p99"]
    add(
        "heartbeat p99, one call in flight (ProcessPool)",
        "<= 1 ms",
        f"{p99 * 1e3:.2f} ms",
        p99 <= 1e-3,
    )
    add(
        "heartbeat max, direct call (baseline)",
        "(frozen)",
        f"{R['lag/mlp/direct']['max'] * 1e3:.1f} ms",
        None,
    )
    st = R["start/ProcessPool-2-workers-module-loaded"]["median"]
    add("ProcessPool start, 2 workers ready with module", "<= 2.5 s", f"{st:.2f} s", st <= 2.5)
    mem, pe = R["memory/ProcessPool"], R["memory/ProcessPoolExecutor"]
    add(
        "memory 2 workers add for a 200 MB module",
        "<= 1.3 x one copy",
        f"{mem['added'] / mem['module']:.2f}x one copy ({mem['added'] / 2**20:.0f} MiB; "
        f"ProcessPoolExecutor: {pe['added'] / mem['module']:.2f}x)",
        mem["added"] <= 1.3 * mem["module"],
    )
    if "mlp/Ray" in R:
        add(
            "Ray actors (baseline): tiny per call / 2 x mlp vs serial",
            "(comparison)",
            f"{R['asyncio/tiny/ray-actor']['median'] * 1e6:,.0f} us / "
            f"{ratio('mlp/serial-1-thread', 'mlp/Ray'):.2f}x",
            None,
        )
        add(
            "RayPool: tiny per call / 2 x mlp vs serial",
            "(comparison with Ray actors)",
            f"{R['asyncio/tiny/RayPool']['median'] * 1e6:,.0f} us / "
            f"{ratio('mlp/serial-1-thread', 'mlp/RayPool'):.2f}x",
            None,
        )
    add(
        "throughput, 32 concurrent callers, tiny",
        "(comparison)",
        f"ThreadPool {R['throughput/ThreadPool']['calls_per_s']:,.0f}/s, "
        f"ProcessPool {R['throughput/ProcessPool']['calls_per_s']:,.0f}/s",
        None,
    )
    for pool in ("ThreadPool", "ProcessPool"):
        bt = R[f"batch/{pool}/Batcher"]["calls_per_s"]
        ub = R[f"batch/{pool}/unbatched"]["calls_per_s"]
        add(
            f"Batcher on {pool}: 1,000 concurrent requests to mlp vs unbatched",
            ">= 5x throughput",
            f"{bt / ub:.1f}x ({bt:,.0f}/s vs {ub:,.0f}/s; mean batch "
            f"{R[f'batch/{pool}/Batcher']['mean_batch']:.0f})",
            bt / ub >= 5,
        )
    added = R["batch/lone/Batcher"]["median"] - R["batch/lone/forward"]["median"]
    add(
        "Batcher: latency added to a lone request (ThreadPool)",
        "<= 1 ms",
        f"{added * 1e3:.2f} ms",
        added <= 1e-3,
    )
    if "cuda/CudaStreamPool" in R:
        sp = ratio("cuda/serial-default-stream", "cuda/CudaStreamPool")
        p99 = R["lag/cuda/CudaStreamPool"]["p99"]
        add(
            "CudaStreamPool: 2 small-kernel modules overlapped vs serial",
            ">= 1.5x, heartbeat p99 <= 2 ms",
            f"{sp:.2f}x, p99 {p99 * 1e3:.2f} ms",
            sp >= 1.5 and p99 <= 2e-3,
        )
    else:
        add("CudaStreamPool: overlapped vs serial", ">= 1.5x", "no GPU on this machine", None)
    return rows


def _met(ok: bool | None, no: str) -> str:
    return "n/a" if ok is None else "yes" if ok else no


def write_report(out: Path, console: Console, quick: bool) -> None:
    rows = targets()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {af.usable_cpus()} usable CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}",
        "quick": quick,
        "command": "python -m aioforward bench" + (" --quick" if quick else ""),
    }
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "results": R, "targets": rows}, indent=2)
    )
    md = [
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}`.",
        "",
        "| figure | target | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    md += [f"| {n} | {t} | {v} | {_met(ok, '**no**')} |" for n, t, v, ok in rows]
    md += [
        "",
        "| per call, tiny module (asyncio) | median | min | max |",
        "| --- | --- | --- | --- |",
    ]
    for k, v in R.items():
        if k.startswith("asyncio/tiny/"):
            md.append(
                f"| {k.split('/')[-1]} | {v['median'] * 1e6:,.0f} us | "
                f"{v['min'] * 1e6:,.0f} us | {v['max'] * 1e6:,.0f} us |"
            )
    (out / "report.md").write_text("\n".join(md) + "\n")
    table = Table(title="aioforward benchmarks: targets")
    for col in ("figure", "target", "measured", "met"):
        table.add_column(col)
    for n, t, v, ok in rows:
        table.add_row(n, t, v, _met(ok, "[red]no[/]"))
    console.print(table)
    plot(out)


def plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), layout="constrained")
    names = [k for k in R if k.startswith("asyncio/tiny/")]
    axes[0].barh([n.split("/")[-1] for n in names], [R[n]["median"] * 1e6 for n in names])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("per call, tiny module (us, log)")
    labels, values = [], []
    for kind in ("mlp", "conv", "transformer"):
        for pool in ("ThreadPool", "ProcessPool"):
            labels.append(f"{kind} {pool}")
            values.append(ratio(f"{kind}/serial-1-thread", f"{kind}/{pool}"))
    axes[1].bar(labels, values)
    axes[1].axhline(2.0, color="k", linestyle="--", label="2-core limit")
    axes[1].set_ylabel("speed-up vs one after the other")
    axes[1].legend(loc="lower right")
    plt.setp(axes[1].get_xticklabels(), rotation=30, ha="right")
    lags = [k for k in R if k.startswith("lag/")]
    axes[2].barh([k[4:] for k in lags], [R[k]["p99"] * 1e3 for k in lags])
    axes[2].set_xscale("log")
    axes[2].set_xlabel("event-loop lag p99 (ms, log)")
    fig.savefig(out / "report.png", dpi=90)


async def main_async(quick: bool, progress: Progress, task: Any) -> None:
    def advance() -> None:
        progress.advance(task)

    await overhead("asyncio", quick, advance)
    await seed(quick, advance)
    await parallel("mlp", quick, advance)
    await parallel("conv", quick, advance)
    await parallel("transformer", quick, advance)
    await memory(quick, advance)
    await ray_actors(quick, advance)
    await big_transfer(quick, advance)
    await startup(quick, advance)
    await throughput(quick, advance)
    await batching(quick, advance)
    await cuda_streams(quick, advance)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aioforward bench")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under 2 minutes)")
    ap.add_argument("--out", default="bench-results", help="folder for the JSON, MD and PNG")
    args = ap.parse_args(argv)
    if os.environ.get("OMP_WAIT_POLICY") is None:
        # OpenMP reads this when torch loads, so it must be in the environment before the
        # interpreter starts: otherwise the threads of a 2-thread direct call spin for a
        # while after it and steal a core from whatever is measured next.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        rest = argv if argv is not None else sys.argv[1:]
        cmd = [sys.executable, "-m", "aioforward", "bench", *rest]
        os.execv(sys.executable, cmd)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    # Same malloc settings in this process (direct calls, threads) as in ProcessPool workers.
    R["meta/keep_freed_memory"] = {"enabled": af.keep_freed_memory()}
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarks", total=19)
        asyncio.run(main_async(args.quick, progress, task))
        import uvloop

        async def uv() -> None:
            await overhead("uvloop", args.quick, lambda: progress.advance(task))

        uvloop.run(uv())
    R["meta/seconds"] = {"total": time.perf_counter() - t0}
    write_report(out, console, args.quick)
    console.print(
        f"wrote {out}/results.json, report.md, report.png in {R['meta/seconds']['total']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
