"""What users do without aioforward: the functions the alternatives run in their workers.

Spawned processes (``ProcessPoolExecutor``, ``anyio.to_process``, the process per call) find
these by importable name, ``aioforward.bench._alternatives.<name>``, so this module imports
nothing beyond torch and the bench's models: a worker pays for no report or plotting library.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from .. import _models
from .._malloc import keep_freed_memory

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from multiprocessing.queues import Queue

# The module a ProcessPoolExecutor worker built in its initializer (one per worker process).
_pe_module: torch.nn.Module | None = None


def build(kind: str) -> torch.nn.Module:
    """One of the bench's modules with fixed weights.

    Example: ``build("tiny")(torch.randn(1, 10))``.
    """
    torch.manual_seed(0)
    module: torch.nn.Module = getattr(_models, kind)()
    return module


def pe_init(kind: str) -> None:
    """``ProcessPoolExecutor`` initializer: one torch thread, the module built once.

    Example: ``ProcessPoolExecutor(2, initializer=pe_init, initargs=("tiny",))``.
    """
    global _pe_module
    torch.set_num_threads(1)
    _pe_module = build(kind)


def pe_run(x: torch.Tensor) -> torch.Tensor:
    """Run the module :func:`pe_init` built in this worker.

    Example: ``await loop.run_in_executor(executor, pe_run, x)``.
    """
    assert _pe_module is not None, "pe_run needs pe_init as the executor's initializer"
    with torch.inference_mode():
        out: torch.Tensor = _pe_module(x)
    return out


def pe_pid(x: torch.Tensor) -> int:
    """Run the worker's module, then hold the worker long enough that the executor starts a
    second one; return this worker's pid.

    Example: ``pids = {await loop.run_in_executor(executor, pe_pid, x) for _ in range(2)}``.
    """
    pe_run(x)
    time.sleep(3)
    return os.getpid()


def direct(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A forward pass called directly, as a coroutine would without a pool.

    Example: ``await asyncio.to_thread(direct, module, x)``.
    """
    with torch.inference_mode():
        out: torch.Tensor = module(x)
    return out


def _rebuild_and_run(kind: str, x: torch.Tensor, q: Queue[Any]) -> None:
    with torch.inference_mode():
        # A tensor would travel by a file descriptor, gone once this process exits.
        q.put(build(kind)(x).numpy())


def seed_call(kind: str, x: torch.Tensor) -> Any:
    """The popular Q&A answer: a new process per call that rebuilds the module.

    Example: ``seed_call("tiny", torch.randn(1, 10))`` (a numpy array, after about a second).
    """
    ctx = multiprocessing.get_context("spawn")
    q: Queue[Any] = ctx.Queue()
    p = ctx.Process(target=_rebuild_and_run, args=(kind, x, q))
    p.start()
    out = q.get()
    p.join()
    return out


def tokens(n: int) -> Any:
    """A generator of ``n`` one-token tensors, like a decoding loop's output (streaming)."""
    for i in range(n):
        yield torch.tensor([i])


def blocks24(width: int = 768) -> torch.nn.Module:
    """24 blocks (each a Linear and a GELU in a Sequential): cancellation stops between them."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU()) for _ in range(24)]
    )


def echo_main(conn: Any, kind: str | None = None) -> None:
    """A spawned process that sends back every message: the floor of a pipe round trip.
    With ``kind``, it first runs the bench's module ``kind`` on its own input (one torch
    thread, inference mode): the floor of a process pool's round trip with the same forward
    pass in the far process, and nothing moved but the message.

    Example: ``ctx.Process(target=echo_main, args=(child_conn, "tiny")).start()``.
    """
    module, x = None, None
    if kind is not None:
        torch.set_num_threads(1)
        module, x = build(kind), _models.INPUTS[kind]()
    try:
        while data := conn.recv_bytes():
            if module is not None:
                with torch.inference_mode():
                    module(x)
            conn.send_bytes(data)
    except EOFError:
        pass


def limit_init(kind: str) -> None:
    """Initializer of a bare single-threaded process holding one module and its input (the
    limit of two modules at once: pure compute, nothing moved per call), with the glibc
    malloc settings a ProcessPool worker has, so that both compute alike.

    Example: ``ProcessPoolExecutor(2, initializer=limit_init, initargs=("mlp",))``.
    """
    global _pe_module, _limit_x
    keep_freed_memory()
    torch.set_num_threads(1)
    _pe_module = build(kind)
    _limit_x = _models.INPUTS[kind]()


_limit_x: Any = None


def limit_run(times: int, start_at: float = 0.0) -> tuple[float, float, int]:
    """Wait until ``start_at`` (``time.monotonic``, one clock for every process here), run
    the process's module ``times`` times on its own input; return when it started and ended,
    and the pid. Timed inside the process, so the executor's hand-offs are not in the limit.

    Example: ``await loop.run_in_executor(executor, limit_run, 2, time.monotonic() + 0.02)``.
    """
    assert _pe_module is not None, "limit_run needs limit_init as the initializer"
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    t0 = time.monotonic()
    with torch.inference_mode():
        for _ in range(times):
            _pe_module(_limit_x)
    return t0, time.monotonic(), os.getpid()


class BareThreads:
    """Two plain threads of this process, each holding one module at one torch thread: the
    limit of a thread pool's two modules at once here (what threads sharing one process
    reach, against :func:`limit_run`'s separate processes). Not an aioforward pool: a
    semaphore each way, nothing else.

    Example: ``with BareThreads(m1, m2, x) as bt: seconds = bt.pair()``.
    """

    def __init__(self, m1: torch.nn.Module, m2: torch.nn.Module, x: torch.Tensor) -> None:
        self._go = [threading.Semaphore(0), threading.Semaphore(0)]
        self._done = threading.Semaphore(0)
        self._stop = False
        self._threads = [
            threading.Thread(target=self._main, args=(m, go, x), daemon=True)
            for m, go in zip((m1, m2), self._go, strict=True)
        ]
        for t in self._threads:
            t.start()

    def _main(self, module: torch.nn.Module, go: threading.Semaphore, x: torch.Tensor) -> None:
        torch.set_num_threads(1)  # OpenMP's count is per thread
        while True:
            go.acquire()
            if self._stop:
                return
            with torch.no_grad():
                module(x)
            self._done.release()

    def pair(self) -> float:
        """Run both modules at once; return the seconds until both ended (this thread
        blocks meanwhile)."""
        t0 = time.perf_counter()
        for go in self._go:
            go.release()
        for _ in self._go:
            self._done.acquire()
        return time.perf_counter() - t0

    def __enter__(self) -> BareThreads:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        for go in self._go:
            go.release()
        for t in self._threads:
            t.join()


def _into_shared(kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():
        out.copy_(build(kind)(x))


def seed_shared_call(kind: str, x: torch.Tensor, out: torch.Tensor) -> Any:
    """The seed's example 2: a process per call that rebuilds the module and writes into an
    output tensor the parent put in shared memory (``share_memory_()``); returns a process
    already started: ``join()`` it, then read ``out``.

    Example: ``p = seed_shared_call("tiny", x, out); p.join()``.
    """
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_into_shared, args=(kind, x, out))
    p.start()
    return p


def manager_run(module: torch.nn.Module, x: torch.Tensor, q: Any, tag: int) -> None:
    """The seed's example 3, in the worker: run the module sent with the call and put the
    result on a ``Manager().Queue()``.

    Example: ``executor.submit(manager_run, module, x, queue, 0)``.
    """
    with torch.inference_mode():
        q.put((tag, module(x).numpy()))


async def awaited(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` as a coroutine, run in the awaiting task: a direct call as a coroutine
    without a pool makes it.

    Example: ``await awaited(direct, module, x)``.
    """
    return fn(*args)


@contextlib.asynccontextmanager
async def echo_round_trip(ctx: Any, kind: str | None = None) -> AsyncIterator[Callable[[], Any]]:
    """A spawned echo process and a round trip to it driven by the event loop (``add_reader``):
    the floor under any process pool's round trip. ``kind``: the echo process runs that
    module's forward pass before each answer (:func:`echo_main`)."""
    loop = asyncio.get_running_loop()
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=echo_main, args=(child, kind), daemon=True)
    proc.start()
    child.close()
    waiting: list[asyncio.Future[bytes]] = []

    def readable() -> None:
        try:
            data = conn.recv_bytes()
        except EOFError:  # the echo process died: stop watching, fail who waits
            loop.remove_reader(conn.fileno())
            while waiting:
                waiting.pop().set_exception(EOFError("the echo process exited"))
            return
        if waiting:
            waiting.pop().set_result(data)

    loop.add_reader(conn.fileno(), readable)
    payload = bytes(100)

    async def round_trip() -> bytes:
        fut: asyncio.Future[bytes] = loop.create_future()
        waiting.append(fut)
        conn.send_bytes(payload)
        return await fut

    try:
        yield round_trip
    finally:
        loop.remove_reader(conn.fileno())
        conn.send_bytes(b"")
        proc.join(5)
        conn.close()
        proc.close()
