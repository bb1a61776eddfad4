"""Modules used by the tests; importable by name so process workers can load them."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 20)
        self.b = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Pair(nn.Module):
    """Two tensors in, one out."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) * y.sum()


def mlp(width: int = 1024, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class Gate(nn.Module):
    """Blocks in forward until ``release`` is set (threads only: events do not cross processes)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("Gate was never released")
        return x + 1


class Sleep(nn.Module):
    """Sleeps ``x.item()`` seconds (or ``seconds``), then returns the pid of the worker."""

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        delay = self.seconds if x is None else float(x.item())
        time.sleep(delay)
        return torch.tensor(os.getpid())


class Busy(nn.Module):
    """Keeps its core busy for ``seconds`` without sleeping, then returns ``x``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return x


class Pid(nn.Module):
    def forward(self, x: Any = None) -> int:
        return os.getpid()


class Warns(nn.Module):
    """Warns ``message``; returns how many warnings got past the process's filters."""

    def forward(self, message: str) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn(message, UserWarning, stacklevel=1)
        return len(caught)


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"boom: {tuple(x.shape)}")


class Point(NamedTuple):
    x: torch.Tensor
    label: str


@dataclass
class Output:
    logits: torch.Tensor
    extra: dict[str, Any]


class ModelOutput(OrderedDict):  # type: ignore[type-arg]
    """Shaped like Hugging Face's ModelOutput: an OrderedDict with attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class Nested(nn.Module):
    """Takes and returns nested structures of tensors and plain values."""

    def forward(self, p: Point, d: dict[str, Any], *, scale: float = 1.0) -> tuple[Any, ...]:
        out = Output(
            logits=p.x * scale, extra={"label": p.label, "items": [t * 2 for t in d["ts"]]}
        )
        return out, ModelOutput(hidden=p.x + 1, n=len(d["ts"])), [None, 3, "s"]


def build_tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny()


class Exit(nn.Module):
    """Ends its worker process: os._exit(code), or a real segfault with code < 0."""

    def __init__(self, code: int = 3) -> None:
        super().__init__()
        self.code = code

    def forward(self, x: Any = None) -> Any:
        if self.code < 0:
            import ctypes

            ctypes.string_at(0)  # SIGSEGV
        os._exit(self.code)


class CloseAndLinger(nn.Module):
    """Closes its worker's pipe to the parent, then lives on ``seconds`` before os._exit(3):
    a worker whose end the parent sees (end of file) before its exit."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: Any = None) -> Any:
        import gc
        import multiprocessing.connection

        for obj in gc.get_objects():
            if isinstance(obj, multiprocessing.connection.Connection) and not obj.closed:
                obj.close()
        time.sleep(self.seconds)
        os._exit(3)


class Hog(nn.Module):
    """Allocates far more than the worker's RLIMIT_AS allows."""

    def forward(self, x: Any = None) -> torch.Tensor:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        return torch.empty(1 << 34, dtype=torch.uint8)


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle calls cls(msg): rebuilding fails
        super().__init__(f"{a}-{b}")


class RaiseUnpicklable(nn.Module):
    def forward(self, x: Any = None) -> Any:
        raise Unpicklable(1, 2)


class ReturnLambda(nn.Module):
    def forward(self, x: Any = None) -> Any:
        return lambda: 1


def _fail_in_parent() -> Any:
    if os.environ.get("AIOFWD_TEST_WORKER") != "1":
        raise RuntimeError("this object only unpickles in a worker")
    return 1


class ParentFails:
    def __reduce__(self) -> Any:
        return (_fail_in_parent, ())


class ReturnParentFails(nn.Module):
    def forward(self, x: Any = None) -> Any:
        return ParentFails()


class KillOnUnpickle:
    def __reduce__(self) -> Any:
        return (os._exit, (7,))


class Shout(nn.Module):
    def forward(self, x: Any = None) -> int:
        import sys

        for _ in range(200):
            sys.stderr.write("x" * 10_000 + "\n")
        return 1


class Echo(nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args, kwargs


class Facts(nn.Module):
    """What the module sees of each tensor it is given: layout, autograd, type, which of the
    others it is, and its values (a lazy conjugate applied)."""

    def forward(self, *args: torch.Tensor, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        ts = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
        facts = [
            (
                t.stride(),
                t.requires_grad,
                type(t).__name__,
                [t is u for u in ts],
                t.detach().resolve_conj().resolve_neg().cpu().tolist(),
            )
            for t in ts
        ]
        others = {
            k: (type(v).__name__, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)
        }
        return facts, others


class Fresh:
    """Holds a tensor and pickles a new one made from it (a temporary, freed once pickled)."""

    def __init__(self, v: torch.Tensor) -> None:
        self.v = v

    def __getstate__(self) -> torch.Tensor:
        return self.v * 1

    def __setstate__(self, state: torch.Tensor) -> None:
        self.v = state


class Permute(nn.Module):
    """Returns its input's dimensions reversed (a dense tensor, not contiguous): alone, the
    same tensor twice, or with another tensor and plain values."""

    def forward(self, x: torch.Tensor, twice: bool = False, pair: bool = False) -> Any:
        y = x.permute(*reversed(range(x.dim()))) * 2
        if pair:
            return y, [y + 1, None, 2]
        return (y, y) if twice else y


def set_worker_flag() -> None:
    os.environ["AIOFWD_TEST_WORKER"] = "1"


def failing_initializer() -> None:
    raise RuntimeError("initializer says no")


def slow_initializer(seconds: float) -> None:
    time.sleep(seconds)


def exiting_initializer() -> None:
    os._exit(3)  # dies at every start without reporting a traceback


def failing_factory() -> nn.Module:
    raise RuntimeError("factory says no")


class Big(nn.Module):
    def __init__(self, mb: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(mb * 1024 * 1024 // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.sum() * x  # reads every page of the weights


class RecordPid(nn.Module):
    """Appends the worker's pid to ``path`` on every call."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def forward(self, x: Any = None) -> int:
        with open(self.path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return os.getpid()


# ---------------------------------------------------------------- streaming and cancellation
def _log(path: str | None, line: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def count(n: int, log: str | None = None, size: int = 2, fail_at: int | None = None) -> Any:
    """Yield ``n`` tensors of ``size`` floats (value i); log each production and the close."""
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"failed at item {i}")
            _log(log, f"made {i}")
            yield torch.full((size,), float(i))
    finally:
        _log(log, "closed")


def count_then_exit(n: int) -> Any:
    yield from range(n)
    os._exit(3)


def count_slowly(n: int, pause: float, log: str | None = None) -> Any:
    try:
        for i in range(n):
            time.sleep(pause)
            yield i
    finally:
        _log(log, "closed")


class Counter(nn.Module):
    """A module whose forward yields, and a generation-like method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, n: int) -> Any:
        for i in range(n):
            yield self.lin(torch.full((1, 2), float(i), device=self.lin.weight.device))

    def generate(self, n: int) -> Any:
        for i in range(n):
            yield (i, os.getpid())


class Block(nn.Module):
    """A block (it has a submodule) that takes ``pause`` seconds and logs its entry."""

    def __init__(self, i: int, pause: float, log: str | None) -> None:
        super().__init__()
        self.i, self.pause, self.log = i, pause, log
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _log(self.log, f"block {self.i}")
        time.sleep(self.pause)
        return self.lin(x)


class Blocks(nn.Module):
    """``n`` blocks of ``pause`` seconds: a forward pass that a cancel can stop midway."""

    def __init__(self, n: int = 24, pause: float = 0.02, log: str | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(i, pause, log) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def entered(log: str) -> list[str]:
    try:
        with open(log) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


class Looping(nn.Module):
    """A long Python loop without submodules, stoppable through ``check_cancelled``."""

    def __init__(self, steps: int, pause: float, log: str) -> None:
        super().__init__()
        self.steps, self.pause, self.log = steps, pause, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import aioforward

        for i in range(self.steps):
            aioforward.check_cancelled()
            _log(self.log, f"step {i}")
            time.sleep(self.pause)
        return x


def not_a_generator(n: int) -> int:
    return n * 2


def default_policy() -> None:
    """A worker initializer: back to the default scheduling policy (a worker's own choice)."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


class Policy(nn.Module):
    """Returns the scheduling policy of the thread that runs its forward pass."""

    def forward(self) -> int:
        return os.sched_getscheduler(0)
