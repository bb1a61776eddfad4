"""Call and ModuleSpec: what a pool is asked to run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Call", "ModuleSpec", "call", "check_module", "module_name"]


@dataclass(frozen=True, eq=False)
class ModuleSpec:
    """A module built inside each worker by calling ``factory(*args, **kwargs)``.

    Use it wherever a module is accepted, for modules that cannot be pickled or
    that should be loaded from a checkpoint where they run. ``factory`` must be
    importable by name (a module-level function or class), since process
    workers receive it by reference::

        spec = ModuleSpec(build_model, "weights.pt", hidden=256)
        y = await aioforward.forward(spec, x, pool=process_pool)

    Each worker (or, in a thread pool, the pool once) calls the factory on first
    use and keeps the module for later calls with the same spec object.
    """

    factory: Callable[..., torch.nn.Module]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __init__(self, factory: Callable[..., torch.nn.Module], *args: Any, **kwargs: Any) -> None:
        if not callable(factory):
            raise TypeError(f"ModuleSpec(factory=...) must be callable, got {factory!r}")
        object.__setattr__(self, "factory", factory)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)

    def build(self) -> torch.nn.Module:
        """Call the factory; raise ``TypeError`` unless it returns an ``nn.Module``."""
        module = self.factory(*self.args, **self.kwargs)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(
                f"ModuleSpec factory {_qualname(self.factory)} returned "
                f"{type(module).__name__}, expected a torch.nn.Module"
            )
        return module

    def __repr__(self) -> str:
        return f"ModuleSpec({_qualname(self.factory)})"


def _qualname(obj: object) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__qualname__


@dataclass(frozen=True, eq=False)
class Call:
    """A module bound to its arguments; made by :func:`call`."""

    module: torch.nn.Module | ModuleSpec | Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return module_name(self.module)


def call(module: torch.nn.Module | ModuleSpec, /, *args: Any, **kwargs: Any) -> Call:
    """Bind a module to its own arguments, for ``run_parallel``.

    Example::

        ya, yb = await aioforward.run_parallel(
            aioforward.call(encoder, tokens), aioforward.call(head, feats, mask=m)
        )
    """
    check_module(module, "module")
    return Call(module, args, kwargs)


def check_module(module: object, argname: str) -> None:
    """Raise ``TypeError`` naming ``argname`` unless ``module`` is a module or ModuleSpec."""
    if not isinstance(module, torch.nn.Module | ModuleSpec):
        raise TypeError(
            f"{argname} must be a torch.nn.Module or an aioforward.ModuleSpec, "
            f"got {type(module).__name__}: {_short_repr(module)}"
        )


def method_owner(fn: object) -> torch.nn.Module | None:
    """The module whose method ``fn`` is (found on it by name), else None: a process or Ray
    pool ships that module once and calls the method on its copy.

    Example: ``method_owner(model.generate) is model``.
    """
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if isinstance(owner, torch.nn.Module) and name and getattr(owner, name, None) == fn:
        return owner
    return None


def module_name(module: object) -> str:
    if isinstance(module, ModuleSpec):
        return repr(module)
    if isinstance(module, torch.nn.Module):
        return type(module).__name__
    return _qualname(module)


def _short_repr(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
