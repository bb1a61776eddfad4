"""What the bench measures: each scenario opens the pools and the alternatives it compares and
records their figures into the run (see ``_measure``). ``SCENARIOS`` lists them in run order;
``python -m aioforward bench --only NAME ...`` picks some by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import importlib.util
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_process
import torch

from .. import _models
from .._cpus import usable_cpus
from ..batching import Batcher
from ..pools.process import ProcessPool
from ..pools.thread import ThreadPool
from . import _alone
from . import _alternatives as alt
from ._measure import (
    Measured,
    Run,
    Skip,
    Step,
    interleaved,
    lag_during,
    per_call,
    record,
    rounds,
    timed,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine

    from ..pools._base import Pool

# The bare processes' common start, this far ahead: time for the executor to hand each its
# call (about 2 ms here), so that both start together.
LIMIT_LEAD_S = 0.02


async def overhead(run: Run, loop_name: str) -> None:
    """Per-call cost of a tiny module, every approach open at once and timed in interleaved
    blocks of 50 calls.

    Example: ``asyncio.run(overhead(Run("smoke"), "asyncio"))``.
    """
    n = run.n(2000, 300, 100)
    m, x = _models.tiny(), _models.INPUTS["tiny"]()
    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")
    async with (
        ThreadPool(workers=2) as tp,
        ProcessPool(workers=2) as pp,
        alt.echo_round_trip(spawn) as pipe,
        alt.echo_round_trip(spawn, "tiny") as pipe_forward,
    ):
        await pp.warmup(m, example=x)
        with concurrent.futures.ProcessPoolExecutor(
            2, mp_context=spawn, initializer=alt.pe_init, initargs=("tiny",)
        ) as ex:
            p = f"{loop_name}/tiny/"
            await interleaved(
                run,
                {
                    p + "pipe-floor": (pipe, 1),
                    p + "pipe+forward": (pipe_forward, 1),
                    p + "direct": (lambda: alt.awaited(alt.direct, m, x), 1),
                    p + "to_thread": (lambda: asyncio.to_thread(alt.direct, m, x), 1),
                    p + "ThreadPool": (lambda: tp.forward(m, x), 1),
                    p + "ProcessPool": (lambda: pp.forward(m, x), 1),
                    p + "ProcessPoolExecutor": (lambda: loop.run_in_executor(ex, alt.pe_run, x), 1),
                    p + "anyio.to_process": (
                        lambda: anyio.to_process.run_sync(alt.direct, m, x),
                        1,
                    ),
                },
                n // 50,
                block=50,
            )


# Not ``-m aioforward.bench._alone``: the package imports _alone (through _scenarios) before
# runpy runs it as __main__, which warns (RuntimeWarning) in every process.
_ALONE_MAIN = "import sys; from aioforward.bench import _alone; _alone.main(sys.argv[1:])"


async def overhead_alone(run: Run) -> None:
    """Per-call cost of a tiny module with each approach alone in a fresh process (see
    ``_alone``), the processes run one after another in rounds, each round starting one
    variant further on.

    Example: ``asyncio.run(overhead_alone(Run("smoke")))``.
    """
    rounds, calls = run.n(3, 2, 1), run.n(3000, 1000, 300)
    has_trio = importlib.util.find_spec("trio") is not None
    variants = [(name, loop) for name, loop in _alone.VARIANTS if loop != "trio" or has_trio]
    samples: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for turn in range(rounds):
        shift = turn % len(variants)
        for name, loop in variants[shift:] + variants[:shift]:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _ALONE_MAIN,
                name,
                "asyncio" if loop == "uvloop" and sys.platform == "win32" else loop,
                str(calls),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(
                    f"the {name} ({loop}) process of overhead-alone exited {proc.returncode}"
                )
            samples[name, loop].append(float(out.decode().strip().splitlines()[-1]))
    for name, loop in variants:
        record(run, f"alone/{loop}/tiny/{name}", samples[name, loop])


async def seed(run: Run) -> None:
    """The popular answer: a new process per call that rebuilds the module.

    Example: ``asyncio.run(seed(Run("smoke")))``.
    """
    x = _models.INPUTS["tiny"]()
    n = run.n(3, 2, 1)
    record(
        run,
        "asyncio/tiny/seed-process-per-call",
        [timed(lambda: alt.seed_call("tiny", x)) for _ in range(n)],
    )
    m = alt.build("tiny")
    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")

    def shared(count: int) -> None:  # example 2: a process per call, shared output tensors
        outs = [torch.empty(1, 5).share_memory_() for _ in range(count)]  # type: ignore[no-untyped-call]
        for p in [alt.seed_shared_call("tiny", x, out) for out in outs]:
            p.join()
            p.close()

    record(run, "seed2/per-call", [timed(lambda: shared(1)) for _ in range(n)])
    record(run, "seed2/two-modules", [timed(lambda: shared(2)) for _ in range(n)])
    # Example 3: an executor running a module sent with each call, results on a Manager queue.
    with (
        spawn.Manager() as manager,
        concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as ex,
    ):
        q = manager.Queue()

        async def managed(count: int) -> None:
            for tag in range(count):
                ex.submit(alt.manager_run, m, x, q, tag)
            for _ in range(count):
                await loop.run_in_executor(None, q.get)

        await managed(2)  # the executor's processes start
        n3 = run.n(50, 15, 5)
        await rounds(run, "seed3/per-call", lambda: managed(1), n3)
        await rounds(run, "seed3/two-modules", lambda: managed(2), n3)
    async with ProcessPool(workers=2) as pp:
        await pp.warmup(m, example=x)
        await rounds(run, "seed/ProcessPool-two-modules", lambda: pp.run_parallel(m, m, x), n3)


async def parallel(run: Run, kind: str) -> None:
    """``run_parallel`` of two modules on each pool against direct calls one after the other,
    then the event loop's heartbeat while they run.

    Example: ``asyncio.run(parallel(Run("smoke"), "mlp"))``.
    """
    n = run.n(15, 5, 3)
    torch.manual_seed(0)
    m1, m2 = getattr(_models, kind)(), getattr(_models, kind)()
    x = _models.INPUTS[kind]()
    cpus = usable_cpus()

    async def serial() -> None:
        alt.direct(m1, x)
        alt.direct(m2, x)

    loop = asyncio.get_running_loop()
    spawn = multiprocessing.get_context("spawn")
    async with ThreadPool(workers=2) as tp, ProcessPool(workers=2) as pp:
        await pp.warmup(m1, m2, example=x)
        with (
            concurrent.futures.ProcessPoolExecutor(
                2, mp_context=spawn, initializer=alt.limit_init, initargs=(kind,)
            ) as bare,
            alt.BareThreads(m1, m2, x) as threads,
        ):
            # Two bare single-threaded processes holding the module and its input: one runs
            # both calls, then each runs one at once. Their ratio is this machine's limit now.
            # Each times its own work from a common start, so the executor's hand-offs (about
            # 2 ms a call) are not counted as compute.
            pids: set[int] = set()
            while len(pids) < 2:
                both = [loop.run_in_executor(bare, alt.limit_run, 3) for _ in range(2)]
                pids |= {pid for _, _, pid in await asyncio.gather(*both)}

            async def bare_run(processes: int, times: int) -> Measured:
                start_at = time.monotonic() + LIMIT_LEAD_S
                spans = await asyncio.gather(
                    *(
                        loop.run_in_executor(bare, alt.limit_run, times, start_at)
                        for _ in range(processes)
                    )
                )
                return Measured(max(e for _, e, _ in spans) - min(s for s, _, _ in spans))

            # One round-robin for the limit and the pools, so that drift hits them alike.
            await interleaved(
                run,
                {
                    f"{kind}/bare-one-process": (lambda: bare_run(1, 2), 1),
                    f"{kind}/bare-two-processes": (lambda: bare_run(2, 1), 1),
                    # the same with two plain threads of this process: what a thread pool
                    # can reach here (threads share caches and memory; processes do not)
                    f"{kind}/bare-two-threads": (lambda: alt.awaited(threads.pair), 1),
                    f"{kind}/serial-1-thread": (serial, 1),
                    f"{kind}/direct-default-threads": (serial, cpus),
                    f"{kind}/ThreadPool": (lambda: tp.run_parallel(m1, m2, x), 1),
                    f"{kind}/ProcessPool": (lambda: pp.run_parallel(m1, m2, x), 1),
                },
                n,
            )
        torch.set_num_threads(cpus)
        await lag_during(run, f"lag/{kind}/direct", serial, n)
        torch.set_num_threads(1)
        await lag_during(
            run, f"lag/{kind}/ThreadPool-both-cores", lambda: tp.run_parallel(m1, m2, x), n
        )
        await lag_during(
            run, f"lag/{kind}/ProcessPool-both-cores", lambda: pp.run_parallel(m1, m2, x), n
        )
        await lag_during(run, f"lag/{kind}/ProcessPool-one-call", lambda: pp.forward(m1, x), n)


async def memory(run: Run) -> None:
    """Memory that 2 workers add to serve one ~200 MB module.

    ProcessPool: the growth of the workers' unique memory (USS) when the module is loaded and
    run on each, plus the shared segment once. ProcessPoolExecutor with the module built in
    each worker's initializer: its workers' USS minus that of the same executor built with
    the tiny module (a copy per worker).

    Example: ``asyncio.run(memory(Run("smoke")))``.
    """
    import psutil

    def uss(pids: list[int]) -> int:
        return sum(int(psutil.Process(p).memory_full_info().uss) for p in pids)

    m = alt.build("wide")
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    x = torch.randn(1, next(m.parameters()).shape[1])  # one Linear(n, n)
    async with ProcessPool(workers=2) as pp:
        await pp.wait_ready()
        base = uss(pp.worker_pids())
        await pp.warmup(m, example=x)
        added = uss(pp.worker_pids()) - base + size  # + the one shared copy
    run.results["memory/ProcessPool"] = {"module": size, "workers_base": base, "added": added}
    loop = asyncio.get_running_loop()
    totals = {}
    for kind, arg in (("tiny", _models.INPUTS["tiny"]()), ("wide", x)):
        with concurrent.futures.ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=alt.pe_init,
            initargs=(kind,),
        ) as ex:
            pids = await asyncio.gather(
                *(loop.run_in_executor(ex, alt.pe_pid, arg) for _ in range(2))
            )
            totals[kind] = uss(sorted(set(pids)))
    run.results["memory/ProcessPoolExecutor"] = {
        "module": size,
        "added": totals["wide"] - totals["tiny"],
    }


class _Actor:
    """A bare Ray actor holding one module (Ray workers import this class by name)."""

    def __init__(self, kind: str) -> None:
        torch.set_num_threads(1)
        self.m = alt.build(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return alt.direct(self.m, x)

    def echo(self, x: torch.Tensor) -> torch.Tensor:
        return x


async def ray_actors(run: Run) -> None:
    """Bare Ray actors, one per module, next to RayPool (ray is an optional extra: without
    it, :class:`Skip`).

    Example: ``asyncio.run(ray_actors(Run("smoke")))``.
    """
    try:
        import ray
    except ImportError:
        raise Skip("ray is not installed (pip install 'aioforward[ray]')") from None
    from ..pools.ray import RayPool

    ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False)
    try:
        remote: Any = ray.remote(num_cpus=1)(_Actor)
        tiny = remote.remote("tiny")
        x = _models.INPUTS["tiny"]()
        n_tiny, n_mlp = run.n(500, 100, 20), run.n(10, 3, 2)
        await per_call(run, "asyncio/tiny/ray-actor", lambda: tiny.forward.remote(x), n_tiny)
        big, n_big = torch.randn(16 << 20), run.n(10, 5, 3)  # 64 MiB

        async def clone() -> None:
            big.clone()

        await rounds(run, "ray/64MiB/clone", clone, n_big)
        await rounds(run, "ray/64MiB/ray-actor", lambda: tiny.echo.remote(big), n_big)
        ray.kill(tiny)
        a, b = remote.remote("mlp"), remote.remote("mlp")
        xm = _models.INPUTS["mlp"]()

        async def both() -> None:
            await asyncio.gather(a.forward.remote(xm), b.forward.remote(xm))

        await rounds(run, "mlp/Ray", both, n_mlp)
        ray.kill(a)
        ray.kill(b)
        mt, m1, m2 = _models.tiny(), _models.mlp(), _models.mlp()
        async with RayPool(workers=2) as rp:
            await rp.warmup(mt, example=x)
            await rp.warmup(m1, m2, example=xm)
            await per_call(run, "asyncio/tiny/RayPool", lambda: rp.forward(mt, x), n_tiny)
            await rounds(run, "mlp/RayPool", lambda: rp.run_parallel(m1, m2, xm), n_mlp)
            echo = torch.nn.Identity()
            await rounds(run, "ray/64MiB/RayPool", lambda: rp.forward(echo, big), n_big)
    finally:
        ray.shutdown()
    await _ray_node_loss(run, ray, RayPool)


async def _ray_node_loss(run: Run, ray: Any, pool_cls: Any) -> None:
    """Seconds from a node's removal until the pool has all its actors ready again, on a
    ``ray.cluster_utils.Cluster`` of three 1-CPU nodes on this machine (two actors spread,
    one node spare; the node comes back after each loss)."""
    from ray.cluster_utils import Cluster

    cluster: Any = Cluster(  # untyped
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        async with pool_cls(workers=2, scheduling_strategy="SPREAD") as rp:
            await rp.wait_ready(120)
            ts = []
            for _ in range(run.n(5, 3, 1)):
                where = rp.worker_nodes()
                victim = next(n for n in cluster.worker_nodes if n.node_id in where)
                t0 = time.perf_counter()
                cluster.remove_node(victim)
                while victim.node_id in rp.worker_nodes() or rp.stats().workers < 2:
                    await asyncio.sleep(0.01)
                ts.append(time.perf_counter() - t0)
                cluster.add_node(num_cpus=1)  # a spare again for the next loss
            record(run, "ray/node-loss/recover", ts)
    finally:
        ray.shutdown()
        cluster.shutdown()


async def big_transfer(run: Run) -> None:
    """A 64 MiB tensor through a ProcessPool worker and back, against one in-memory clone.

    Example: ``asyncio.run(big_transfer(Run("smoke")))``.
    """
    big = torch.randn(16 * 1024 * 1024)  # 64 MiB
    ident = torch.nn.Identity()

    async def clone() -> None:
        big.clone()

    async with ProcessPool(workers=1) as pp:
        await interleaved(
            run,
            {
                "64MiB/clone": (clone, 1),
                "64MiB/ProcessPool-round-trip": (lambda: pp.forward(ident, big), 1),
            },
            run.n(15, 5, 3),
        )


async def startup(run: Run) -> None:
    """From ``ProcessPool(workers=2)`` to both workers ready with an mlp loaded.

    Example: ``asyncio.run(startup(Run("smoke")))``.
    """
    m, x = _models.mlp(), _models.INPUTS["mlp"]()
    ts = []
    for _ in range(run.n(3, 1, 1)):
        t0 = time.perf_counter()
        async with ProcessPool(workers=2) as pp:
            await pp.warmup(m, example=x)
            ts.append(time.perf_counter() - t0)
    record(run, "start/ProcessPool-2-workers-module-loaded", ts)


async def throughput(run: Run) -> None:
    """32 concurrent callers of a tiny module on each pool.

    Example: ``asyncio.run(throughput(Run("smoke")))``.
    """
    m, x = _models.tiny(), _models.INPUTS["tiny"]()
    callers, each = 32, run.n(50, 10, 5)
    pools: list[tuple[str, Callable[[], Pool]]] = [
        ("ThreadPool", lambda: ThreadPool(workers=2)),
        ("ProcessPool", lambda: ProcessPool(workers=2)),
    ]
    for name, make in pools:
        async with make() as pool:
            await pool.warmup(m, example=x)

            async def caller(pool: Pool = pool) -> None:
                for _ in range(each):
                    await pool.forward(m, x)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for _ in range(callers):
                    tg.start_soon(caller)
            rate = callers * each / (time.perf_counter() - t0)
            run.results[f"throughput/{name}"] = {"calls_per_s": rate}


async def batching(run: Run) -> None:
    """1,000 concurrent single-sample requests to mlp (250 in a smoke run), batched and not,
    on each pool; then the latency a Batcher adds to a lone request (low load).

    Example: ``asyncio.run(batching(Run("smoke")))``.
    """
    m, x = _models.mlp(), torch.randn(1024)
    n_requests, reps, lone = run.n(1000, 1000, 250), run.n(9, 3, 1), run.n(200, 30, 20)

    async def burst(step: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(n_requests):
                tg.start_soon(step)

    async def request_alone() -> None:  # a request's own task, suspended once, and no work
        await anyio.lowlevel.checkpoint()

    # This machine's own gain from batching: 64 single-sample forward passes against one
    # batch of 64, called directly at one torch thread, as each pool's worker computes. The
    # Batcher's gain over unbatched calls can pass it only by the pools' per-call cost.
    batch = 64  # the Batchers' max_batch_size
    x_batch = torch.stack([x] * batch)

    async def singles() -> None:
        for _ in range(batch):
            alt.direct(m, x)

    await interleaved(
        run,
        {
            "batch/limit/singles": (singles, 1),
            "batch/limit/one-batch": (lambda: alt.awaited(alt.direct, m, x_batch), 1),
        },
        run.n(15, 5, 2),
    )
    run.results["batch/limit/one-batch"]["size"] = batch
    pools: list[tuple[str, Callable[[], Pool]]] = [
        ("ThreadPool", lambda: ThreadPool(workers=2)),
        ("ProcessPool", lambda: ProcessPool(workers=2)),
    ]
    for kind, make in pools:
        async with make() as pool, Batcher(m, pool, max_batch_size=batch) as b:
            await pool.warmup(m, example=x)
            variants: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
                # the burst's own cost (its tasks), measured beside the others
                "tasks-only": request_alone,
                "unbatched": functools.partial(pool.forward, m, x),
                "Batcher": functools.partial(b, x),
            }
            rates: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            for rep in range(reps + 1):  # the first round warms up
                for name, step in variants.items():
                    # Every burst starts from the same collector state: a full collection
                    # (about 80 ms in a process holding torch) otherwise lands in one burst
                    # or another by chance and swamps its CPU per request.
                    gc.collect()
                    c0, t0 = time.process_time(), time.perf_counter()
                    await burst(step)
                    if rep:
                        rates[name].append(n_requests / (time.perf_counter() - t0))
                        cpu[name].append((time.process_time() - c0) / n_requests)
            for name, rs in rates.items():
                run.results[f"batch/{kind}/{name}"] = {
                    "calls_per_s": statistics.median(rs),
                    "parent_cpu": statistics.median(cpu[name]),  # this process, every thread
                }
                if name != "tasks-only":
                    # What serving a request adds to its own task: each round's figure less
                    # the tasks-only burst of the same round (paired, so that a slow stretch
                    # of the machine hits both sides of the difference).
                    run.results[f"batch/{kind}/{name}"]["net_cpu"] = statistics.median(
                        [c - a for c, a in zip(cpu[name], cpu["tasks-only"], strict=True)]
                    )
            s = b.stats()
            run.results[f"batch/{kind}/Batcher"]["mean_batch"] = s.samples / s.batches
            run.results[f"batch/{kind}/Batcher"]["requests"] = n_requests
            if kind == "ThreadPool":
                await interleaved(
                    run,
                    {
                        "batch/lone/forward": (variants["unbatched"], 1),
                        "batch/lone/Batcher": (variants["Batcher"], 1),
                    },
                    lone,
                )


async def cuda_streams(run: Run) -> None:
    """Two small-kernel modules (``_models.SmallGrid``): one after the other on the default
    stream vs overlapped; the same for two 8-layer mlps, whose kernels a fast GPU ends before
    Python launches the next (without a usable GPU, :class:`Skip` with the reason).

    Example: ``asyncio.run(cuda_streams(Run("smoke")))``.
    """
    from ..pools.cuda import CudaStreamPool, cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        raise Skip(reason)
    s1, s2 = _models.SmallGrid().cuda(), _models.SmallGrid().cuda()
    m1, m2 = _models.mlp(256, 8).cuda(), _models.mlp(256, 8).cuda()
    x = torch.randn(32, 256, device="cuda")

    def serial(a: torch.nn.Module, b: torch.nn.Module) -> Step:
        async def step() -> None:
            with torch.inference_mode():
                a(x)
                b(x)
            torch.cuda.synchronize()

        return step

    async with CudaStreamPool(workers=4) as pool:
        await interleaved(
            run,
            {
                "cuda/small-grid/serial-default-stream": (serial(s1, s2), 1),
                "cuda/small-grid/CudaStreamPool": (lambda: pool.run_parallel(s1, s2, x), 1),
                "cuda/serial-default-stream": (serial(m1, m2), 1),
                "cuda/CudaStreamPool": (lambda: pool.run_parallel(m1, m2, x), 1),
            },
            run.n(100, 20, 10),
        )
        await lag_during(
            run, "lag/cuda/CudaStreamPool", lambda: pool.run_parallel(s1, s2, x), run.n(50, 50, 10)
        )


async def result_mode(run: Run) -> None:
    """What returning ordinary tensors costs: the same forward pass under ``torch.no_grad()``
    (what the pools run, so results behave like a direct call's) and under
    ``torch.inference_mode()`` (inference tensors, refused in place outside it), interleaved.

    Example: ``asyncio.run(result_mode(Run("smoke")))``.
    """
    for kind, n in (("tiny", run.n(3000, 600, 200)), ("transformer", run.n(200, 40, 10))):
        m = getattr(_models, kind)()
        x = _models.INPUTS[kind]()

        def under(mode: Callable[[], Any], m: torch.nn.Module = m, x: Any = x) -> Any:
            with mode():
                return m(x)

        def step(mode: Callable[[], Any]) -> Callable[[], Coroutine[Any, Any, Any]]:
            return functools.partial(alt.awaited, under, mode)

        await interleaved(
            run,
            {
                f"mode/{kind}/no_grad": (step(torch.no_grad), 1),
                f"mode/{kind}/inference_mode": (step(torch.inference_mode), 1),
            },
            max(1, n // 10),
            block=10,
        )


async def streaming(run: Run) -> None:
    """Time to the first item and cost per item of a 200-item generator: ``pool.stream`` on a
    ThreadPool and a ProcessPool against the same generator driven by hand from a thread
    through an ``asyncio.Queue``, in interleaved rounds.

    Example: ``asyncio.run(streaming(Run("smoke")))``.
    """
    n_items, n_rounds = 200, run.n(15, 5, 2)
    loop = asyncio.get_running_loop()

    async def by_hand() -> Any:
        q: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def produce() -> None:
            for item in alt.tokens(n_items):
                loop.call_soon_threadsafe(q.put_nowait, item)
            loop.call_soon_threadsafe(q.put_nowait, end)

        fut = loop.run_in_executor(None, produce)
        first = await q.get()
        yield first
        while (item := await q.get()) is not end:
            yield item
        await fut

    first: dict[str, list[float]] = {}
    each: dict[str, list[float]] = {}
    async with ThreadPool(workers=1) as tp, ProcessPool(workers=1) as pp:
        await pp.wait_ready()
        variants: dict[str, Callable[[], Any]] = {
            "stream/by-hand": by_hand,
            "stream/ThreadPool": lambda: tp.stream(alt.tokens, n_items),
            "stream/ProcessPool": lambda: pp.stream(alt.tokens, n_items),
        }
        for r in range(n_rounds + 1):
            for name, make in variants.items():
                t0 = time.perf_counter()
                it = make().__aiter__()
                await it.__anext__()
                t1 = time.perf_counter()
                count = 1
                async for _ in it:
                    count += 1
                t2 = time.perf_counter()
                assert count == n_items, (name, count)
                if r:  # the first round warms up
                    first.setdefault(name, []).append(t1 - t0)
                    each.setdefault(name, []).append((t2 - t1) / (n_items - 1))
    for name in variants:
        record(run, f"{name}/first", first[name])
        record(run, f"{name}/item", each[name])


async def cancelling(run: Run) -> None:
    """Cooperative cancellation on a 24-block model: from ``cancel()`` to the slot being free
    (pid unchanged) on a ProcessPool and a ThreadPool, next to kill-and-replace (the process
    pool without cancellation checks, ``kill_on_cancel=True``: until a new worker is ready);
    and the checks' cost on the tiny and transformer forward passes.

    Example: ``asyncio.run(cancelling(Run("smoke")))``.
    """
    from .._cancel import install_checks, stacks

    model, x = alt.blocks24(1024), torch.randn(1280, 1024)  # a pass of a few hundred ms
    n = run.n(8, 3, 1)

    async def free_after_cancel(pool: Pool, ready: bool) -> tuple[float, bool]:
        pids = pool.worker_pids()
        fut = pool.submit(model, x)
        await asyncio.sleep(0.1)  # well inside the pass
        t0 = time.perf_counter()
        fut.cancel()
        while pool.stats().busy or (ready and pool.stats().workers < pool.workers):
            await asyncio.sleep(0.0005)
        return time.perf_counter() - t0, pool.worker_pids() == pids

    async with (
        ProcessPool(workers=1) as coop,
        ProcessPool(workers=1, cancel_checks=False, kill_on_cancel=True) as kill,
        ThreadPool(workers=1) as tp,
    ):
        for p in (coop, kill, tp):
            await p.warmup(model, example=x)
        pass_s = min([timed(lambda: coop.submit(model, x).result()) for _ in range(3)])
        run.results["cancel/pass"] = {"median": pass_s, "block": pass_s / 24}
        for name, pool, ready in (
            ("cancel/ProcessPool", coop, False),
            ("cancel/ThreadPool", tp, False),
            ("cancel/ProcessPool-kill", kill, True),
        ):
            samples, kept = [], True
            for _ in range(n):
                dt, same = await free_after_cancel(pool, ready)
                samples.append(dt)
                kept = kept and same
            record(run, name, samples)
            run.results[name]["pid_kept"] = float(kept)
    for kind, reps in (("tiny", run.n(3000, 600, 200)), ("transformer", run.n(100, 30, 10))):
        m, xin = getattr(_models, kind)(), _models.INPUTS[kind]()
        found = stacks(m)
        run.results[f"checks/{kind}/count"] = {"median": float(len(found))}
        plain_cls = [type(s) for s in found]
        install_checks(m)
        checked_cls = [type(s) for s in found]

        def under(
            classes: list[type[torch.nn.Module]],
            m: torch.nn.Module = m,
            xin: Any = xin,
            found: list[torch.nn.Module] = found,
        ) -> Any:
            # Both variants set the stacks' classes, so they pay the same bookkeeping.
            for s, cls in zip(found, classes, strict=True):
                s.__class__ = cls
            with torch.no_grad():
                return m(xin)

        await interleaved(
            run,
            {
                f"checks/{kind}/off": (functools.partial(alt.awaited, under, plain_cls), 1),
                f"checks/{kind}/on": (functools.partial(alt.awaited, under, checked_cls), 1),
            },
            max(1, reps // 2),
            block=2,
        )


@dataclass(frozen=True)
class Scenario:
    """A named part of the bench, run on a fresh event loop of its kind."""

    name: str
    title: str
    measure: Callable[[Run], Coroutine[Any, Any, None]]
    loop: Literal["asyncio", "uvloop"] = "asyncio"


def _on(
    fn: Callable[[Run, str], Coroutine[Any, Any, None]], arg: str
) -> Callable[[Run], Coroutine[Any, Any, None]]:
    return lambda run: fn(run, arg)


# Run order: the order of the reference runs in benchmarks/results.
SCENARIOS: tuple[Scenario, ...] = (
    Scenario("overhead-asyncio", "per-call cost, tiny module, asyncio", _on(overhead, "asyncio")),
    Scenario("seed", "a new process per call (the popular answer)", seed),
    Scenario("parallel-mlp", "run_parallel of 2 x mlp, and loop lag", _on(parallel, "mlp")),
    Scenario("parallel-conv", "run_parallel of 2 x conv, and loop lag", _on(parallel, "conv")),
    Scenario(
        "parallel-transformer",
        "run_parallel of 2 x transformer, and loop lag",
        _on(parallel, "transformer"),
    ),
    Scenario("memory", "memory 2 workers add for a 200 MB module", memory),
    Scenario("ray", "bare Ray actors and RayPool", ray_actors),
    Scenario("transfer", "64 MiB tensor round trip", big_transfer),
    Scenario("startup", "ProcessPool start with a module loaded", startup),
    Scenario("throughput", "32 concurrent callers", throughput),
    Scenario("batching", "Batcher: 1,000 concurrent requests to mlp", batching),
    Scenario("cuda", "CudaStreamPool on a GPU", cuda_streams),
    Scenario("result-mode", "no_grad (ordinary results) vs inference_mode", result_mode),
    Scenario("streaming", "pool.stream: first item and per item", streaming),
    Scenario("cancel", "cooperative cancellation of a 24-block pass", cancelling),
    Scenario(
        "overhead-uvloop", "per-call cost, tiny module, uvloop", _on(overhead, "uvloop"), "uvloop"
    ),
    Scenario("overhead-alone", "per-call cost, tiny module, each approach alone", overhead_alone),
)
NAMES: tuple[str, ...] = tuple(s.name for s in SCENARIOS)
# The representative figures (per call against every alternative, run_parallel with loop lag,
# the Batcher) for a CI check that the bench works: most of its time is the nine torch worker
# processes these start, about 20 s on 2 idle cores.
SMOKE: tuple[str, ...] = ("overhead-asyncio", "parallel-mlp", "batching")
