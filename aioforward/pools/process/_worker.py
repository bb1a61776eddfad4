"""The worker process's entry point: torch set-up, the initializer, then a loop of calls.

Thread counts are set in the environment the parent gives the worker
(``OMP_NUM_THREADS``), since OpenMP reads them when torch first loads: unpickling this
entry point imports the ``aioforward`` package, and torch with it, before it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sys
import threading
import time
import traceback
import types
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from ... import _cancel
from ..._stream import iter_of, not_a_call
from ...errors import WorkerStartError, encode_exception
from . import _frames as fr
from ._messages import (
    OOM_EXIT,
    CallMsg,
    Item,
    Ok,
    OutOfMemory,
    Raised,
    Ready,
    SegmentRef,
    StartFailed,
    Stop,
    StreamCtl,
    Unsendable,
)
from ._transport import (
    Outbox,
    Segment,
    ensure_segment,
    load_module,
    loads,
    recv_fds,
    recv_message,
    send_fds,
    send_message,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection


class WorkerOptions(NamedTuple):
    """What the parent tells a worker at start."""

    parent_pid: int
    name: str  # label of the worker's output segments
    threads: int
    interop_threads: int
    seed: int | None
    initializer: Callable[..., object] | None
    initargs: tuple[Any, ...]
    inline_bytes: int
    memfd: bool
    cancel_checks: bool


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies (even while a forward pass runs): no orphans."""
    while True:
        time.sleep(0.25)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(conn: Connection, opts: WorkerOptions) -> None:
    # Ctrl-C is for the parent, which stops its pools: a worker that raised KeyboardInterrupt
    # would print a traceback and fail the call it runs. The parent spawned us with SIGINT
    # blocked (see _supervisor._sigint_blocked): ignoring it discards one already pending.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(
        target=_watch_parent, args=(opts.parent_pid,), name="aioforward-parent-watch", daemon=True
    ).start()
    batch_policy()  # before torch starts its threads, which inherit it
    try:
        torch.set_num_threads(opts.threads)
        try:
            torch.set_num_interop_threads(opts.interop_threads)
        except RuntimeError:  # already set (e.g. the user's __main__ ran a parallel op)
            pass
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        if opts.initializer is not None:
            opts.initializer(*opts.initargs)
    except BaseException:
        _send(conn, StartFailed(traceback.format_exc()))
        sys.exit(1)
    # The parent wakes us through an eventfd after each message (see _Server.serve).
    wake_fd = os.eventfd(0, os.EFD_CLOEXEC) if hasattr(os, "eventfd") else None
    _send(conn, Ready(os.getpid(), wake_fd is not None), None if wake_fd is None else [wake_fd])
    _Server(conn, opts, wake_fd).serve()


def batch_policy() -> None:
    """Run this thread, and the threads it starts from now on, under ``SCHED_BATCH`` (Linux):
    the scheduler's policy for CPU-bound work, as fair as the default one, but a batch task
    woken up does not preempt the task running where it lands. The parent's event loop wakes
    a worker for each call, and on a busy machine the kernel often wakes it on the loop's own
    core: under the default policy it took the core from the loop at once, which then sat
    behind it (up to the next scheduler tick, 4 ms, while the other core idled). Measured here
    with two workers computing an mlp pair in turn with each policy: the loop's 1 ms heartbeat
    was late by 3.1-4.3 ms at p99, against 2.3-3.4 ms with ``SCHED_BATCH``, and the parent's
    eventfd write that wakes a worker returned after 1 ms on average (preempted), against
    50-90 us; the pair's time and a tiny call's did not move. The loop still preempts a worker
    when it wakes. An initializer may set another policy
    (``os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))``).

    Example: ``batch_policy()`` (in a worker process, before torch starts threads)."""
    if not hasattr(os, "SCHED_BATCH"):
        return  # not Linux
    # Refused (a seccomp profile, say): the default policy is still correct.
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


SPIN_S = 200e-6
"""How long an idle worker looks for its next message before it sleeps (see :func:`_spin`)."""
SPIN_AFTER_S = 500e-6
"""An idle worker looks for its next message only after a call that computed for less."""


def _spin(pending: select.poll) -> bool:
    """Look for the next message on the pipe for ``SPIN_S``; return whether it came.

    A call awaited right after the last one (a generation loop, a client's next request)
    reaches the worker tens of microseconds after its reply (some 40 us here on asyncio;
    trio's tasks read their replies themselves too). Asleep, the worker costs the
    parent an eventfd write that wakes another core (8 us of the parent's time on this
    VM's 2 vCPUs, and the wake-up's latency besides): a tiny module's round trip, alone
    in a program, took 100 us asleep and 69 us with this look. Each pass yields the core
    to any other task waiting for it there, and the look ends after ``SPIN_S``.

    Only after a short call (``SPIN_AFTER_S``): a call of 0.5 ms or more pays its wake-up
    in under a tenth of its time, and a looking worker counts as load, so the kernel does
    not move a task waiting on the other core to its core: looking after the Batcher's
    batches cost its throughput 4% here."""
    end = time.perf_counter() + SPIN_S
    while time.perf_counter() < end:
        os.sched_yield()
        if pending.poll(0):
            return True
    return False


class _Server:
    """The worker's state: modules it holds and the segments it has mapped."""

    def __init__(self, conn: Connection, opts: WorkerOptions, wake_fd: int | None) -> None:
        self.conn = conn
        self.opts = opts
        self.wake_fd = wake_fd
        self.modules: dict[Any, torch.nn.Module] = {}
        self.segments: dict[int, Segment] = {}  # parent's segments: sid -> mapping
        self.weights_of: dict[Any, int] = {}  # module key -> its weight segment sid
        self.request_sid: int | None = None  # the parent's current request segment
        self.out: Segment | None = None  # our own response segment
        self.spin = False  # the last message was a short call's: look for the next first

    def serve(self) -> None:
        """Run the parent's messages one by one until it says stop (or is gone).

        Between calls the worker sleeps on its eventfd, not on the pipe: the parent writes a
        message, then the eventfd. A write to a Unix socket or pipe wakes its reader as a
        "sync" wake-up, which tells the kernel the writer will sleep at once, so the reader
        is put on the writer's core, often before the writer's own process: the parent's
        loop sending ``run_parallel``'s second call sat behind the first worker for 2-5 ms
        (the next balancing tick) in a quarter of the bench's rounds, while the other core
        was idle, and so did the second worker. An eventfd's wake-up is not sync, and a
        sleeping worker wakes on an idle core when there is one. After a short call, before
        it sleeps, an idle worker looks at its pipe for a moment (:func:`_spin`): a call
        sent meanwhile needs no wake-up at all. (During a stream the worker still waits on
        the pipe for its credits.)"""
        fd = self.conn.fileno()
        wake_fd = self.wake_fd
        pending = select.poll()  # is a message waiting on the pipe? (or its end)
        pending.register(fd, select.POLLIN)
        while True:
            try:
                if (
                    wake_fd is not None
                    and not pending.poll(0)
                    and not (self.spin and _spin(pending))
                ):
                    # The message is on the pipe before the eventfd is written. A stale count
                    # (left by messages read without waiting: a call already there when the
                    # last reply went out, a stream's credits, a call caught by the look)
                    # returns at once: wait again, without looking.
                    # (Read on instead, the worker would wait on the pipe, and the eventfd
                    # written after that message would leave a stale count for the next
                    # wait: every wait after the first stale count would be on the pipe.)
                    os.eventfd_read(wake_fd)
                    while not pending.poll(0):
                        os.eventfd_read(wake_fd)
                data = recv_message(fd)
                self.spin = False  # set again by the reply of a short call (_reply)
                if data[0] == fr.CALL:  # the common call, in a frame of its own
                    sid = self.request_sid
                    seq, key, args, kwargs = fr.read_call(
                        data, self.segments[sid] if sid is not None else None
                    )
                    del data  # not kept alive while the call runs
                    self._framed(seq, key, args, kwargs)
                    continue
                msg = pickle.loads(data)
                del data
                if isinstance(msg, Stop):
                    return
                if isinstance(msg, StreamCtl):
                    continue  # for a stream that has ended
                assert isinstance(msg, CallMsg), msg
                fds = recv_fds(self.conn, len(msg.new)) if self.opts.memfd and msg.new else []
            except (EOFError, OSError):
                return
            for i, ref in enumerate(msg.new):
                self.segments[ref.sid] = Segment.receive(
                    ref, self.opts.memfd, fds[i] if fds else None
                )
            if msg.control is not None:
                _cancel.set_process_word(self.segments[msg.control].buf.data_ptr())
            self._forget(msg.drops)
            if msg.request is not None and msg.request != self.request_sid:
                if self.request_sid is not None:  # it grew: unmap the old one
                    self.segments.pop(self.request_sid, None)
                self.request_sid = msg.request
            self._call(msg)

    def _forget(self, keys: tuple[Any, ...]) -> None:
        """Modules the parent released or reloaded: drop them and unmap their weights."""
        for key in keys:
            self.modules.pop(key, None)
            sid = self.weights_of.pop(key, None)
            if sid is not None and sid not in self.weights_of.values():
                self.segments.pop(sid, None)

    def _framed(
        self,
        seq: int,
        key: tuple[int, int],
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """A call frame: the per-call path of a shipped module and small tensors. It does what
        :meth:`_call` does for such a call, in fewer steps."""
        fn = self.modules.get(key)
        if fn is None:  # cannot happen (the parent ships a module first); _call reports it
            self._call(CallMsg((), None, [], (), None, b"", seq, ref=("m", key)), (args, kwargs))
            return
        t0 = time.perf_counter()
        _cancel.set_process_seq(seq)
        try:
            _cancel.check_cancelled()  # cancelled while it was on its way
            with _inference():
                out = fn(*args, **kwargs)
            del args, kwargs
        except BaseException as exc:
            self._raised(exc)
            return
        finally:
            _cancel.set_process_seq(-1)
        compute = time.perf_counter() - t0
        if isinstance(out, types.GeneratorType):
            out.close()
            self._raised(TypeError(not_a_call(type(fn).__name__)))
        else:
            self._reply(out, compute)

    def _raised(self, exc: BaseException) -> None:
        """Report a call's exception; a worker out of memory exits (the parent replaces it)."""
        if _is_oom(exc):
            _send(self.conn, OutOfMemory(traceback.format_exc()))
            os._exit(OOM_EXIT)
        _send(self.conn, Raised(encode_exception(exc)))

    def _call(
        self, msg: CallMsg, framed: tuple[tuple[Any, ...], dict[str, Any]] | None = None
    ) -> None:
        """Run one call (``framed``: its arguments and keyword arguments, read from a call
        frame) and reply."""
        t0 = time.perf_counter()
        _cancel.set_process_seq(msg.seq)
        try:
            if msg.load is not None:
                key, blob, wsid = msg.load
                if wsid is not None:
                    self.weights_of[key] = wsid
                self.modules[key] = self._hooked(
                    load_module(blob, self.segments[wsid] if wsid is not None else None)
                )
            seg = self.segments[msg.request] if msg.request is not None else None
            kwargs: dict[str, Any]
            if framed is not None or msg.binary:  # a shipped module's ref, an args section
                assert msg.ref is not None
                ref = msg.ref
                args, kwargs = framed if framed is not None else fr.read_args(msg.body, 0, seg)
                framed = None
            elif msg.ref is not None:
                ref = msg.ref
                args, kwargs = loads(msg.body, seg, msg.table, copy=False)
            else:
                ref, args, kwargs = loads(msg.body, seg, msg.table, copy=False)
            fn = self._resolve(ref)
            owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
            # results are rebuilt as ordinary tensors in the parent
            mode = _inference if isinstance(owner, torch.nn.Module) else contextlib.nullcontext
            _cancel.check_cancelled()  # cancelled while it was on its way
            if msg.stream:
                self._stream(msg, fn, args, kwargs, mode)
                out = None
            else:
                with mode():
                    out = fn(*args, **kwargs)
                if isinstance(out, types.GeneratorType):
                    out.close()
                    raise TypeError(not_a_call(getattr(fn, "__qualname__", type(fn).__name__)))
            del args, kwargs
        except BaseException as exc:
            self._raised(exc)
            return
        finally:
            _cancel.set_process_seq(-1)
        self._reply(out, time.perf_counter() - t0)  # a stream's end: an Ok of None

    def _reply(self, out: Any, compute: float) -> None:
        """Send a call's result: a reply frame for a plain tensor (a large one in this
        worker's response segment, once the parent has mapped one that holds it), else an
        ``Ok`` (large tensors in that segment, made or grown first)."""
        self.spin = compute < SPIN_AFTER_S
        data = fr.reply_frame(compute, out, self.opts.inline_bytes, self.out)
        if data is not None:
            del out
            _send_bytes(self.conn, data)
            return
        box = Outbox(self.opts.inline_bytes)
        new: tuple[SegmentRef, ...] = ()
        try:
            payload = box.dumps(out)
            size = box.big_bytes()
            table_out = []
            if size:
                new = self._ensure_out(size)
                assert self.out is not None
                table_out = box.write(self.out)
        except BaseException as exc:
            _send(self.conn, Unsendable(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            return
        finally:
            del out
        sid = self.out.sid if table_out and self.out is not None else None
        fds = [self.out.fd] if new and self.out is not None and self.out.fd is not None else []
        _send(self.conn, Ok(new, sid, table_out, payload, compute), fds)
        if new and self.out is not None:
            self.out.close_fd()  # the parent has its own descriptor now

    def _stream(
        self,
        msg: CallMsg,
        fn: Any,
        args: Any,
        kwargs: Any,
        mode: Callable[[], contextlib.AbstractContextManager[Any]],
    ) -> None:
        """Send each item ``fn`` yields as an ``Item``, within the credits the parent gives;
        stop when it is cancelled; close the iterator in any case."""
        credits = msg.stream
        segment_busy = False  # the parent has not copied the last item out of self.out yet
        with mode():
            it = iter_of(fn(*args, **kwargs), getattr(fn, "__qualname__", type(fn).__name__))
        try:
            while not _cancel.cancel_requested():
                with mode():
                    try:
                        value = next(it)
                    except StopIteration:
                        return
                box = Outbox(self.opts.inline_bytes)
                payload = box.dumps(value)
                size = box.big_bytes()
                del value
                while credits == 0 or (size and segment_busy):
                    ctl = self._control(msg.seq)
                    if ctl.cancel:
                        return
                    credits += ctl.credit
                    segment_busy = segment_busy and not ctl.freed
                new: tuple[SegmentRef, ...] = ()
                table: list[tuple[int, str, tuple[int, ...]]] = []
                if size:
                    new = self._ensure_out(size)
                    assert self.out is not None
                    table = box.write(self.out)
                    segment_busy = True
                sid = self.out.sid if table and self.out is not None else None
                fds = [self.out.fd] if new and self.out is not None and self.out.fd else []
                _send(self.conn, Item(new, sid, table, payload), fds)
                if new and self.out is not None:
                    self.out.close_fd()
                credits -= 1
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with mode():
                    close()  # the generator's finally runs here

    def _control(self, seq: int) -> StreamCtl:
        """Wait for the parent's next word about stream ``seq`` (older ones are dropped)."""
        while True:
            try:
                msg = pickle.loads(recv_message(self.conn.fileno()))
            except (EOFError, OSError):
                os._exit(1)  # the parent is gone
            if isinstance(msg, StreamCtl) and msg.seq == seq:
                return msg

    def _hooked(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.opts.cancel_checks:
            _cancel.install_checks(module)
        return module

    def _ensure_out(self, size: int) -> tuple[SegmentRef, ...]:
        old = self.out
        self.out = ensure_segment(old, f"{self.opts.name}_out", size, self.opts.memfd)
        return () if self.out is old else (self.out.ref,)

    def _resolve(self, ref: tuple[Any, ...]) -> Any:
        kind = ref[0]
        if kind == "m":
            return self.modules[ref[1]]
        if kind == "meth":  # a method of a shipped module (e.g. generate)
            return getattr(self.modules[ref[1]], ref[2])
        if kind == "spec":
            _, key, spec = ref
            if key not in self.modules:
                try:
                    self.modules[key] = self._hooked(spec.build())
                except BaseException as exc:
                    raise WorkerStartError(
                        f"{spec!r} failed in worker pid {os.getpid()}: {type(exc).__name__}: {exc}"
                    ) from exc
            return self.modules[key]
        return ref[1]


def _inference() -> contextlib.AbstractContextManager[Any]:
    """``torch.inference_mode()`` without its Python wrapper: 1.5 us instead of 3.5 us here,
    against 22 us for the tiny module's whole forward pass."""
    return torch._C._InferenceMode(True)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _send(conn: Connection, msg: Any, fds: list[int] | None = None) -> None:
    _send_bytes(conn, pickle.dumps(msg, protocol=5), fds)


def _send_bytes(conn: Connection, data: bytes, fds: list[int] | None = None) -> None:
    try:
        send_message(conn.fileno(), data)
        if fds:
            send_fds(conn, fds)
    except (BrokenPipeError, OSError):
        os._exit(1)
