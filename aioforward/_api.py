"""The module-level API: forward, run_parallel, AsyncModule and the default pool."""

from __future__ import annotations

import enum
import threading
from typing import TYPE_CHECKING, Any, Final

from ._call import Call, ModuleSpec, check_module
from ._stream import DEFAULT_BUFFER, ForwardStream
from .errors import PoolClosedError
from .pools._base import Pool, parse_parallel, run_calls

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch

__all__ = [
    "DEFAULT",
    "AsyncModule",
    "Default",
    "default_pool",
    "forward",
    "resolve_pool",
    "run_parallel",
    "set_default_pool",
    "stream",
]


class Default(enum.Enum):
    """The type of :data:`DEFAULT`."""

    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "aioforward.DEFAULT"


DEFAULT: Final = Default.DEFAULT
"""Sentinel for ``pool=``: use :func:`default_pool` (distinct from ``None``)."""

_default: Pool | None = None
_default_lock = threading.Lock()
_default_owned = False  # True when we created it (and so must close it at exit)


def default_pool() -> Pool:
    """The process-wide pool used when ``pool=`` is not given.

    Created on first use: a :class:`ThreadPool` with one thread per usable CPU.
    Threads add the least per call (tens of microseconds) and share weights;
    see the README for when a :class:`ProcessPool` is the better default and
    :func:`set_default_pool` to install one. A pool you installed and then
    closed is not replaced behind your back: it raises ``PoolClosedError``
    until you install another or call ``set_default_pool(None)``::

        pool = aioforward.default_pool()
        print(pool.stats())
    """
    global _default, _default_owned
    pool = _default
    if pool is not None and not pool.closed:
        return pool
    with _default_lock:
        if _default is not None and _default.closed and not _default_owned:
            raise PoolClosedError(
                f"the default pool installed with set_default_pool() ({_default!r}) has been "
                "closed; install another, or call aioforward.set_default_pool(None) to go back "
                "to the built-in thread pool"
            )
        if _default is None or _default.closed:
            from .pools.thread import ThreadPool

            _default = ThreadPool(name="aioforward-default")
            _default_owned = True
        return _default


def set_default_pool(pool: Pool | None) -> Pool | None:
    """Install ``pool`` as the process-wide default; return the previous one (or None).

    ``None`` goes back to a lazily created thread pool. A default pool that
    aioforward created itself is closed when it is replaced; one you installed
    stays yours to close::

        aioforward.set_default_pool(aioforward.ProcessPool(workers=2))
    """
    global _default, _default_owned
    if pool is not None and not isinstance(pool, Pool):
        raise TypeError(f"pool must be an aioforward Pool or None, got {pool!r}")
    with _default_lock:
        previous, owned = _default, _default_owned
        _default, _default_owned = pool, False
    if owned and previous is not None:
        previous.close()
        return None
    return previous


def resolve_pool(pool: Pool | Default) -> Pool:
    """``pool=`` as given to an API function: the pool itself, or the default pool.

    Example: ``resolve_pool(aioforward.DEFAULT) is aioforward.default_pool()``.
    """
    if pool is DEFAULT:
        return default_pool()
    if not isinstance(pool, Pool):
        raise TypeError(f"pool must be an aioforward Pool or aioforward.DEFAULT, got {pool!r}")
    return pool


async def forward(
    module: torch.nn.Module | ModuleSpec,
    /,
    *args: Any,
    pool: Pool | Default = DEFAULT,
    timeout: float | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``module(*args, **kwargs)`` in a pool and return its result; the loop stays free.

    Example::

        logits = await aioforward.forward(model, input_ids, attention_mask=mask)

    ``timeout`` (seconds) raises the built-in ``TimeoutError``; cancelling the
    awaiting task cancels the call (a queued call never runs; a running one is
    released, see :class:`~aioforward.ForwardFuture`).
    """
    check_module(module, "module")
    return await resolve_pool(pool)._call(Call(module, args, kwargs), timeout)


def stream(
    fn: Callable[..., Iterable[Any]] | torch.nn.Module | ModuleSpec,
    /,
    *args: Any,
    pool: Pool | Default = DEFAULT,
    buffer: int = DEFAULT_BUFFER,
    timeout: float | None = None,
    **kwargs: Any,
) -> ForwardStream[Any]:
    """Stream the items ``fn(*args, **kwargs)`` yields, produced in a pool's worker.

    Example::

        async for token in aioforward.stream(model.generate_tokens, ids, max_new_tokens=32):
            await websocket.send_text(tokenizer.decode(token))

    See :meth:`Pool.stream` for back-pressure (``buffer``), ``timeout`` and
    what leaving the loop early does.
    """
    return resolve_pool(pool).stream(fn, *args, buffer=buffer, timeout=timeout, **kwargs)


async def run_parallel(
    *modules_and_args: Any,
    pool: Pool | Default = DEFAULT,
    timeout: float | None = None,
    **kwargs: Any,
) -> tuple[Any, ...]:
    """Run several modules at once; return their results as a tuple in module order.

    The leading ``nn.Module`` (or ``ModuleSpec``) arguments are the modules and
    the remaining arguments go to each of them; or pass one
    :func:`aioforward.call` per module for different arguments::

        y1, y2 = await aioforward.run_parallel(encoder_a, encoder_b, x)
        ya, yb = await aioforward.run_parallel(call(m1, x1), call(m2, x2, k=v))

    When a call fails, the others are cancelled and the first failure is raised
    as itself, with a note naming the module that failed.
    """
    calls = parse_parallel(modules_and_args, kwargs)
    return await run_calls(resolve_pool(pool), calls, timeout)


class AsyncModule:
    """Wrap a module so that calling it returns an awaitable forward pass.

    Example::

        amodel = aioforward.AsyncModule(model)
        y = await amodel(x)
        amodel.module.eval()     # the wrapped module stays reachable

    ``pool`` defaults to :func:`default_pool` (looked up at each call).
    """

    def __init__(self, module: torch.nn.Module | ModuleSpec, pool: Pool | Default = DEFAULT):
        check_module(module, "module")
        if pool is not DEFAULT and not isinstance(pool, Pool):
            raise TypeError(f"pool must be an aioforward Pool or aioforward.DEFAULT, got {pool!r}")
        self.module = module
        self.pool = pool

    async def __call__(self, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        return await resolve_pool(self.pool)._call(Call(self.module, args, kwargs), timeout)

    def __repr__(self) -> str:
        return f"AsyncModule({self.module!r})"
