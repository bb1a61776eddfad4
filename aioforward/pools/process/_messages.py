"""The messages between the parent and a worker process: small typed records.

Each crosses the worker's pipe pickled. A message that introduces shared-memory
segments the receiver has not seen lists them in ``new``; on Linux their memfd
descriptors follow on the same Unix socket right after it (``SCM_RIGHTS``), in
that order. This module must not import torch (the worker imports it first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ...errors import EncodedException

OOM_EXIT = 75  # a worker exits with this code after running out of memory
MAIN_GUARD_EXIT = 76  # a worker's bootstrap re-ran a main module that started a pool


class SegmentRef(NamedTuple):
    """A shared-memory segment: ``sid`` is unique per creator, ``name`` names a /dev/shm file
    (fallback) or labels a memfd."""

    sid: int
    size: int
    name: str


class Load(NamedTuple):
    """Parent -> worker: build the module ``key`` from ``blob``; its weights are in segment
    ``weights`` (a sid), if any."""

    key: Any
    blob: bytes
    weights: int | None


# ---------------------------------------------------------------- parent -> worker
class CallMsg(NamedTuple):
    """Run one call. ``request``: the segment holding its large tensors (``table`` says where);
    ``drops``: module keys to forget first; ``body``: the pickled (args, kwargs), with the
    module reference ``ref`` beside it when that is a shipped module's (else the pickled
    (module ref, args, kwargs)).
    ``seq``: the call's number (the parent writes it into the control word to cancel it);
    ``stream``: for a streaming call, the items the worker may send ahead (its credits);
    ``control``: the control segment's sid, with the first call only;
    ``binary``: ``body`` is an args section of ``_frames`` (tensors, plain keywords), not a
    pickle.
    (A call that needs none of the other fields travels as a bare ``_frames`` call frame.)"""

    new: tuple[SegmentRef, ...]
    request: int | None
    table: list[tuple[int, str, tuple[int, ...]]]
    drops: tuple[Any, ...]
    load: Load | None
    body: bytes
    seq: int = 0
    stream: int = 0
    control: int | None = None
    ref: tuple[Any, ...] | None = None
    binary: bool = False


class StreamCtl(NamedTuple):
    """During streaming call ``seq``: ``credit`` more items may be sent; ``freed``: the
    response segment was copied out; ``cancel``: stop (the control word says so too, but a
    worker waiting for credit is woken by this)."""

    seq: int
    credit: int = 0
    freed: bool = False
    cancel: bool = False


class Stop(NamedTuple):
    """Exit after the current call (the worker is idle when it is sent)."""

    reason: str = "stop"


# ---------------------------------------------------------------- worker -> parent
class Ready(NamedTuple):
    """The worker is ready; ``wake``: the descriptor of its wake-up eventfd follows (Linux)."""

    pid: int
    wake: bool = False


class StartFailed(NamedTuple):
    """The initializer (or torch's set-up) raised; the worker exits."""

    traceback: str


class Ok(NamedTuple):
    """The call's result: ``payload`` pickled, large tensors in segment ``segment``."""

    new: tuple[SegmentRef, ...]
    segment: int | None
    table: list[tuple[int, str, tuple[int, ...]]]
    payload: bytes
    compute_s: float


class Item(NamedTuple):
    """One item of a streaming call, encoded like ``Ok``'s payload."""

    new: tuple[SegmentRef, ...]
    segment: int | None
    table: list[tuple[int, str, tuple[int, ...]]]
    payload: bytes


class Raised(NamedTuple):
    """The module (or loading it) raised."""

    error: EncodedException


class Unsendable(NamedTuple):
    """The result could not be pickled in the worker."""

    text: str
    traceback: str


class OutOfMemory(NamedTuple):
    """The worker ran out of memory; it exits with ``OOM_EXIT`` right after."""

    traceback: str
