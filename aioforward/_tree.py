"""Flatten nested arguments and outputs into leaves, and rebuild them.

Containers: tuples, lists, dicts (``OrderedDict`` and other subclasses keep
their type), NamedTuples and dataclass instances (Hugging Face ``ModelOutput``
included, rebuilt from their ``init`` fields). Everything else is a leaf.
A spec is a nested tuple of types and keys, so two structures are the same
exactly when their specs compare equal.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["LEAF", "Spec", "flatten", "unflatten"]

Spec = tuple[Any, ...]
LEAF: Spec = ("leaf",)  # the spec of a leaf alone
# Leaves known by their exact type, before any container check.
_PLAIN_LEAVES = frozenset({torch.Tensor, torch.nn.Parameter, int, float, str, bool, type(None)})


def flatten(obj: Any) -> tuple[list[Any], Spec]:
    """Return ``(leaves, spec)``; ``unflatten(spec, iter(leaves))`` rebuilds ``obj``.

    Example::

        leaves, spec = flatten({"x": (t1, t2), "n": 3})   # leaves == [t1, t2, 3]
    """
    leaves: list[Any] = []
    return leaves, _flatten(obj, leaves)


def _flatten(obj: Any, leaves: list[Any]) -> Spec:
    # The common shapes first, by exact type: a Batcher flattens every request's arguments,
    # and ``is_dataclass`` alone costs more than the rest of a tuple of tensors.
    cls = type(obj)
    if cls is tuple or cls is list:
        return ("seq", cls, tuple([_flatten(v, leaves) for v in obj]))
    if cls is dict:
        keys = tuple(obj)
        return ("dict", cls, keys, tuple([_flatten(obj[k], leaves) for k in keys]))
    if cls in _PLAIN_LEAVES:
        leaves.append(obj)
        return LEAF
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        names = tuple(f.name for f in dataclasses.fields(obj) if f.init)
        kids = tuple([_flatten(getattr(obj, n), leaves) for n in names])
        return ("dataclass", cls, names, kids)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return ("namedtuple", cls, tuple([_flatten(v, leaves) for v in obj]))
    if isinstance(obj, (tuple, list)):
        return ("seq", cls, tuple([_flatten(v, leaves) for v in obj]))
    if isinstance(obj, dict):
        keys = tuple(obj)
        return ("dict", cls, keys, tuple([_flatten(obj[k], leaves) for k in keys]))
    leaves.append(obj)
    return LEAF


def unflatten(spec: Spec, leaves: Iterator[Any]) -> Any:
    """Rebuild the structure described by ``spec`` from ``leaves`` (consumed in order).

    Example: ``unflatten(spec, iter(new_leaves))``.
    """
    kind = spec[0]
    if kind == "leaf":
        return next(leaves)
    if kind == "dataclass":
        _, cls, names, kids = spec
        return cls(**{n: unflatten(k, leaves) for n, k in zip(names, kids, strict=True)})
    if kind == "namedtuple":
        return spec[1](*(unflatten(k, leaves) for k in spec[2]))
    if kind == "seq":
        return spec[1](unflatten(k, leaves) for k in spec[2])
    _, cls, keys, kids = spec
    return cls((key, unflatten(k, leaves)) for key, k in zip(keys, kids, strict=True))
