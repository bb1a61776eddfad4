"""Moving tensors between processes through warm, reused shared memory.

Pickle does the structure (any nesting of tuples, dicts, dataclasses, ...);
tensors are pulled out with ``persistent_id``:

* small tensors (``<= INLINE_BYTES``) travel inline as their bytes, compacted,
  so a small view never ships its base storage;
* larger ones are only *recorded* while pickling (so an unpicklable input still
  fails in ``submit``), then copied into the receiver's segment just before
  sending, and described by (offset, dtype, shape) in a small table;
* module weights go once into a segment of their own that every worker maps
  read-write: N workers, one copy.

Segments are plain files in ``/dev/shm`` named ``aiofwd_<owner pid>_...``. They
are mapped and their descriptor closed at once (no descriptor per segment, so
``ulimit -n`` is never the limit), reused call after call (fresh shared memory
costs page faults: ~117 ms for 64 MiB here, against ~3 ms for a warm copy) and
reserved with ``posix_fallocate`` so a full ``/dev/shm`` gives a clear error
instead of SIGBUS. We do not use :class:`multiprocessing.shared_memory.SharedMemory`
because before Python 3.13 every process that attaches registers the segment
with the resource tracker (bpo-38119), which then unlinks or warns about
segments it does not own; names carrying the owner's pid let the next pool
sweep what a killed process left behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ...errors import SerializationError

INLINE_BYTES = 64 * 1024  # below this a copy through the pipe beats shm bookkeeping
ALIGN = 64  # cache-line alignment of every tensor in a segment
MIN_SEGMENT = 1 << 20  # segments start at 1 MiB and double, so growth is rare
SHM_DIR = Path("/dev/shm")
PREFIX = "aiofwd_"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name)
    assert isinstance(dt, torch.dtype)
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def shm_free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class Segment:
    """A named shared-memory file mapped as a uint8 tensor, with no descriptor kept open.

    ``torch.from_file(shared=True)`` maps the file and closes its descriptor
    (``mmap.mmap`` would keep a duplicate per mapping before Python 3.13).
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self.buf = torch.from_file(str(SHM_DIR / name), shared=True, size=size, dtype=torch.uint8)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve now: ENOSPC here, never SIGBUS later
        except OSError as exc:
            os.unlink(path)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise SerializationError(
                    f"not enough shared memory: {size} bytes needed in {SHM_DIR}, "
                    f"{shm_free_bytes()} free; enlarge /dev/shm or send smaller tensors"
                ) from exc
            raise
        finally:
            os.close(fd)
        return cls(name, size)

    @classmethod
    def attach(cls, name: str) -> Segment:
        return cls(name, (SHM_DIR / name).stat().st_size)

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor viewing this segment (no copy)."""
        count = _numel(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        nbytes = count * _itemsize(dtype)
        return self.buf[offset : offset + nbytes].view(dtype).view(shape)

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)


def ensure_segment(seg: Segment | None, prefix: str, gen: int, need: int) -> tuple[Segment, int]:
    """Return ``seg`` if it holds ``need`` bytes, else a larger replacement.

    The old segment is unlinked; the new one is named ``prefix + str(gen + 1)`` and sized to
    the next power of two (at least MIN_SEGMENT), so growth is rare and pages stay warm.
    Returns the segment and its generation.
    """
    if seg is not None and seg.size >= need:
        return seg, gen
    if seg is not None:
        seg.unlink()
    gen += 1
    size = max(MIN_SEGMENT, 1 << (need - 1).bit_length())
    return Segment.create(f"{prefix}{gen}", size), gen


def unlink_prefix(prefix: str) -> None:
    """Remove every segment whose name starts with ``prefix``."""
    for p in SHM_DIR.glob(prefix + "*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale() -> int:
    """Unlink segments whose owner process is gone (a killed parent or worker)."""
    swept = 0
    for p in SHM_DIR.glob(PREFIX + "*"):
        try:
            pid = int(p.name[len(PREFIX) :].split("_", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                swept += 1
        except PermissionError:
            pass
    return swept


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _as_bytes(t: torch.Tensor) -> bytes:
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _is_plain(t: torch.Tensor) -> bool:
    return (
        t.layout is torch.strided
        and t.device.type == "cpu"
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and type(t) in (torch.Tensor, torch.nn.Parameter)
    )


class Outbox:
    """Pickles a message, keeping large tensors aside to copy into shared memory."""

    def __init__(self, inline_bytes: int = INLINE_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self.big: list[torch.Tensor] = []

    def dumps(self, obj: Any) -> bytes:
        f = io.BytesIO()
        p = pickle.Pickler(f, protocol=5)
        p.persistent_id = self._persistent_id  # type: ignore[method-assign]
        p.dump(obj)
        return f.getvalue()

    def _persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or not _is_plain(obj):
            return None
        t = obj.detach()
        nbytes = t.numel() * t.element_size()
        if nbytes <= self.inline_bytes:
            return ("i", _dtype_name(t.dtype), tuple(t.shape), _as_bytes(t))
        self.big.append(t)
        return ("s", len(self.big) - 1)

    def big_bytes(self) -> int:
        return sum(_round(t.numel() * t.element_size()) for t in self.big)

    def write(self, seg: Segment) -> list[tuple[int, str, tuple[int, ...]]]:
        """Copy the large tensors into ``seg``; return their (offset, dtype, shape) table."""
        table = []
        off = 0
        for t in self.big:
            seg.view(off, t.dtype, tuple(t.shape)).copy_(t)
            table.append((off, _dtype_name(t.dtype), tuple(t.shape)))
            off += _round(t.numel() * t.element_size())
        return table


def loads(
    data: bytes,
    seg: Segment | None,
    table: list[tuple[int, str, tuple[int, ...]]],
    *,
    copy: bool,
) -> Any:
    """Unpickle a message made by :class:`Outbox`; ``copy=False`` returns views of ``seg``."""

    def persistent_load(pid: Any) -> torch.Tensor:
        if pid[0] == "i":
            _, dt, shape, raw = pid
            dtype = _dtype(dt)
            if not raw:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)
        off, dt, shape = table[pid[1]]
        assert seg is not None
        v = seg.view(off, _dtype(dt), shape)
        return v.clone() if copy else v

    u = pickle.Unpickler(io.BytesIO(data))
    u.persistent_load = persistent_load  # type: ignore[method-assign]
    return u.load()


# ---------------------------------------------------------------------------- module weights
class ShippedModule:
    """A module pickled once, its parameters and buffers in one shared segment."""

    def __init__(self, blob: bytes, seg: Segment | None) -> None:
        self.blob = blob
        self.seg = seg

    def release(self) -> None:
        if self.seg is not None:
            self.seg.unlink()
            self.seg = None


def ship_module(module: torch.nn.Module, seg_name: str, max_bytes: int | None) -> ShippedModule:
    """Pickle ``module`` with its weights placed in a new shared segment (one copy for all)."""
    places: dict[tuple[int, int], int] = {}  # (data_ptr, nbytes) of a storage -> offset
    storages: list[tuple[int, torch.UntypedStorage]] = []
    size = 0
    for t in [*module.parameters(), *module.buffers()]:
        if not _is_plain(t):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in places and st.nbytes() > 0:
            places[key] = size
            storages.append((size, st))
            size += _round(st.nbytes())
    seg = None
    if size:
        check_room(size, max_bytes)
        seg = Segment.create(seg_name, max(size, ALIGN))
        for off, st in storages:
            src = torch.empty(0, dtype=torch.uint8).set_(st)
            seg.view(off, torch.uint8, (st.nbytes(),)).copy_(src)

    def persistent_id(obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or not _is_plain(obj):
            return None
        st = obj.untyped_storage()
        off = places.get((st.data_ptr(), st.nbytes()))
        if off is None:
            return None
        return (
            "w",
            off,
            st.nbytes(),
            _dtype_name(obj.dtype),
            tuple(obj.shape),
            obj.stride(),
            obj.storage_offset(),
            isinstance(obj, torch.nn.Parameter),
            obj.requires_grad,
        )

    f = io.BytesIO()
    p = pickle.Pickler(f, protocol=5)
    p.persistent_id = persistent_id  # type: ignore[method-assign]
    try:
        p.dump(module)
    except BaseException:
        if seg is not None:
            seg.unlink()
        raise
    return ShippedModule(f.getvalue(), seg)


def load_module(blob: bytes, seg: Segment | None) -> torch.nn.Module:
    """Rebuild a shipped module; its weights view the shared segment."""

    def persistent_load(pid: Any) -> torch.Tensor:
        _, off, nbytes, dt, shape, stride, storage_offset, is_param, rg = pid
        assert seg is not None
        dtype = _dtype(dt)
        base = seg.view(off, torch.uint8, (nbytes,)).view(dtype)
        t = base.as_strided(shape, stride, base.storage_offset() + storage_offset)
        return torch.nn.Parameter(t, requires_grad=rg) if is_param else t

    u = pickle.Unpickler(io.BytesIO(blob))
    u.persistent_load = persistent_load  # type: ignore[method-assign]
    module = u.load()
    assert isinstance(module, torch.nn.Module)
    return module


def check_room(size: int, max_bytes: int | None) -> None:
    """Raise SerializationError (bytes needed and free) when ``size`` cannot be placed."""
    if max_bytes is not None and size > max_bytes:
        raise SerializationError(
            f"not enough shared memory: {size} bytes needed, the pool's shm_limit allows "
            f"{max_bytes}; raise shm_limit or send smaller tensors"
        )
    free = shm_free_bytes()
    if size > free:
        raise SerializationError(
            f"not enough shared memory: {size} bytes needed in {SHM_DIR}, {free} free; "
            "enlarge /dev/shm or send smaller tensors"
        )


def find_unpicklable(module: torch.nn.Module) -> str | None:
    """The dotted path of the first attribute of ``module`` that cannot be pickled."""
    for prefix, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, dict) and attr.endswith("hooks"):
                items = list(value.items())
                for k, v in items:
                    try:
                        pickle.dumps(v)
                    except Exception:
                        return f"{prefix + '.' if prefix else ''}{attr}[{k!r}] ({type(v).__name__})"
                continue
            try:
                pickle.dumps(value)
            except Exception:
                return f"{prefix + '.' if prefix else ''}{attr} ({type(value).__name__})"
    return None
