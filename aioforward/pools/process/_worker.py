"""The worker process: torch initialiser, then a loop of calls from its pipe.

This module must not import torch at import time: thread settings are read when
torch first loads, and the worker sets them before that.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.connection import Connection

# Message kinds, parent -> worker
CALL, STOP = "call", "stop"
# worker -> parent
READY, START_FAILED, OK, EXC, SER_ERR, OOM = "ready", "start_failed", "ok", "exc", "serr", "oom"

OOM_EXIT = 75  # the worker exits with this code after running out of memory


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent dies (even while a forward pass runs): no orphans."""
    while True:
        time.sleep(0.25)
        if os.getppid() != parent_pid:
            os._exit(1)


def worker_main(
    conn: Connection,
    parent_pid: int,
    out_prefix: str,
    threads: int,
    interop_threads: int,
    seed: int | None,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    inline_bytes: int,
) -> None:
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import torch

        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(interop_threads)
        except RuntimeError:  # already set (e.g. the user's __main__ ran a parallel op)
            pass
        if seed is not None:
            torch.manual_seed(seed)
        if initializer is not None:
            initializer(*initargs)
    except BaseException:
        conn.send_bytes(pickle.dumps((START_FAILED, traceback.format_exc())))
        sys.exit(1)
    conn.send_bytes(pickle.dumps((READY, os.getpid())))
    _serve(conn, out_prefix, inline_bytes)


def _serve(conn: Connection, out_prefix: str, inline_bytes: int) -> None:
    import torch

    from ._transport import Outbox, Segment, ensure_segment, load_module, loads

    modules: dict[Any, torch.nn.Module] = {}
    weights: dict[str, Segment] = {}  # weight segment name -> mapping
    weights_of: dict[Any, str] = {}  # module key -> its weight segment name
    in_seg: Segment | None = None
    out_seg: Segment | None = None
    generation = 0
    while True:
        try:
            raw = conn.recv_bytes()
        except (EOFError, OSError):
            return
        msg = pickle.loads(raw)
        if msg[0] == STOP:
            return
        _, seg_name, table, drops, shipped, body = msg
        for key in drops:  # modules the parent released or reloaded: unmap their weights
            modules.pop(key, None)
            wname = weights_of.pop(key, None)
            if wname is not None and wname not in weights_of.values():
                weights.pop(wname, None)
        t0 = time.perf_counter()
        try:
            if seg_name is not None and (in_seg is None or in_seg.name != seg_name):
                in_seg = Segment.attach(seg_name)
            if shipped is not None:
                key, blob, wname = shipped
                if wname is not None:
                    if wname not in weights:
                        weights[wname] = Segment.attach(wname)
                    weights_of[key] = wname
                modules[key] = load_module(blob, weights.get(wname) if wname else None)
            ref, args, kwargs = loads(body, in_seg, table, copy=False)
            fn = _resolve(ref, modules)
            if isinstance(fn, torch.nn.Module):
                with torch.inference_mode():
                    out = fn(*args, **kwargs)
            else:
                out = fn(*args, **kwargs)
            del args, kwargs
        except BaseException as exc:
            if _is_oom(exc):
                _send(conn, (OOM, traceback.format_exc()))
                os._exit(OOM_EXIT)
            _send(conn, _exception_message(exc))
            continue
        compute = time.perf_counter() - t0
        box = Outbox(inline_bytes)
        try:
            payload = box.dumps(out)
            size = box.big_bytes()
            table_out = []
            if size:
                out_seg, generation = ensure_segment(out_seg, out_prefix, generation, size)
                table_out = box.write(out_seg)
        except BaseException as exc:
            _send(conn, (SER_ERR, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            continue
        finally:
            del out
        seg_name = out_seg.name if table_out and out_seg is not None else None
        _send(conn, (OK, seg_name, table_out, payload, compute))


def _resolve(ref: tuple[Any, ...], modules: dict[Any, Any]) -> Any:
    kind = ref[0]
    if kind == "m":
        return modules[ref[1]]
    if kind == "spec":
        _, key, spec = ref
        if key not in modules:
            try:
                modules[key] = spec.build()
            except BaseException as exc:
                from ...errors import WorkerStartError

                raise WorkerStartError(
                    f"{spec!r} failed in worker pid {os.getpid()}: {type(exc).__name__}: {exc}"
                ) from exc
        return modules[key]
    return ref[1]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def _exception_message(exc: BaseException) -> tuple[Any, ...]:
    tb = "".join(traceback.format_exception(exc))
    tb = f"worker pid {os.getpid()}:\n{tb}"
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)  # many exceptions pickle but cannot be rebuilt: check here
    except BaseException:
        blob = None
    return (EXC, blob, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), tb)


def _send(conn: Connection, msg: tuple[Any, ...]) -> None:
    try:
        conn.send_bytes(pickle.dumps(msg, protocol=5))
    except (BrokenPipeError, OSError):
        os._exit(1)
