"""Moving tensors between processes through warm, reused shared memory.

Pickle does the structure (any nesting of tuples, dicts, dataclasses, ...);
tensors are pulled out with ``persistent_id``:

* small tensors (``<= INLINE_BYTES``) travel inline as their bytes, compacted,
  so a small view never ships its base storage;
* a tensor arrives as it left: a dense one in its own layout (channels_last, a
  transpose: :func:`dense_strides`), ``requires_grad`` and ``Parameter`` kept, a
  lazy conjugate or negation applied, and one tensor named twice in a message
  rebuilt once (``x, x`` arrive as one tensor, not two copies);
* larger ones are only *recorded* while pickling (so an unpicklable input still
  fails in ``submit``), then copied into the receiver's segment just before
  sending, and described by (offset, dtype, shape) in a small table;
* module weights go once into a segment of their own that every worker maps
  read-write: N workers, one copy.

Segments (chosen in one place, :data:`MEMFD`):

* Linux: anonymous ``memfd_create`` files. Nothing is ever named in
  ``/dev/shm``; a segment's descriptor travels once to the other process over
  the worker's Unix socket (``SCM_RIGHTS``), both sides map it and close the
  descriptor, and the kernel frees the memory when the last mapping goes, a
  SIGKILLed parent included. Docker's 64 MB ``/dev/shm`` does not limit them.
* elsewhere (or with ``AIOFORWARD_SHM=named``): files in ``/dev/shm`` named
  ``aiofwd_<owner pid>_...``, unlinked when released; the next pool sweeps
  what a killed process left behind.

Either way a segment is mapped with ``torch.from_file`` and no descriptor is
kept per segment (``ulimit -n`` is never the limit), segments are reused call
after call (fresh shared memory costs page faults: ~117 ms for 64 MiB here,
against ~3 ms for a warm copy) and reserved with ``posix_fallocate`` so a full
tmpfs gives a clear error instead of SIGBUS. We do not use
:class:`multiprocessing.shared_memory.SharedMemory`: before Python 3.13 every
process that attaches registers the segment with the resource tracker
(bpo-38119), which then unlinks or warns about segments it does not own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import itertools
import os
import pickle
import select
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...errors import SerializationError
from ._messages import SegmentRef

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

INLINE_BYTES = 64 * 1024  # below this a copy through the pipe beats shm bookkeeping
ALIGN = 64  # cache-line alignment of every tensor in a segment
MIN_SEGMENT = 1 << 20  # segments start at 1 MiB and double, so growth is rare
SHM_DIR = Path("/dev/shm")
PREFIX = "aiofwd_"
# The one place the kind of segment is chosen (the worker is told the parent's choice).
MEMFD = hasattr(os, "memfd_create") and os.environ.get("AIOFORWARD_SHM", "") != "named"

_sids = itertools.count(1)


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name)
    assert isinstance(dt, torch.dtype)
    return dt


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def shm_free_bytes(memfd: bool = MEMFD) -> int:
    """Bytes a new segment may take: available memory for memfd, free space in /dev/shm."""
    if memfd:
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class Segment:
    """Shared memory mapped as a uint8 tensor.

    ``fd`` is the memfd while this process may still have to hand it to another
    (a weight segment, for workers started later); otherwise it is closed right
    after mapping. ``torch.from_file(shared=True)`` maps a path and closes its
    own descriptor; a memfd is reached through ``/proc/self/fd``.
    """

    def __init__(self, ref: SegmentRef, memfd: bool, fd: int | None) -> None:
        self.sid, self.size, self.name = ref
        self.memfd = memfd
        self.fd = fd
        path = f"/proc/self/fd/{fd}" if memfd else str(SHM_DIR / self.name)
        self.buf = torch.from_file(path, shared=True, size=self.size, dtype=torch.uint8)

    @property
    def ref(self) -> SegmentRef:
        return SegmentRef(self.sid, self.size, self.name)

    @classmethod
    def create(cls, name: str, size: int, *, memfd: bool = MEMFD, keep_fd: bool = True) -> Segment:
        """A new segment of ``size`` bytes, reserved now (a clear error when memory is short)."""
        if memfd:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:
            fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve now: ENOSPC here, never SIGBUS later
            seg = cls(SegmentRef(next(_sids), size, name), memfd, fd)
        except OSError as exc:
            os.close(fd)
            if not memfd:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(SHM_DIR / name)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                where = "memory" if memfd else str(SHM_DIR)
                raise SerializationError(
                    f"not enough shared memory: {size} bytes needed in {where}, "
                    f"{shm_free_bytes(memfd)} free; free memory, enlarge /dev/shm or send "
                    "smaller tensors"
                ) from exc
            raise
        if not memfd or not keep_fd:
            seg.close_fd()
        return seg

    @classmethod
    def receive(cls, ref: SegmentRef, memfd: bool, fd: int | None) -> Segment:
        """Map a segment made by the other process (its memfd ``fd``, or its name)."""
        seg = cls(ref, memfd, fd)
        seg.close_fd()
        return seg

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def view(
        self,
        offset: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        strides: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """A tensor viewing this segment (no copy): contiguous, or laid out by ``strides``
        (dense: see :func:`dense_strides`)."""
        count = numel(shape)
        if count == 0:
            return empty(shape, strides, dtype)
        flat = self.buf[offset : offset + count * dtype.itemsize].view(dtype)
        return flat.view(shape) if strides is None else flat.as_strided(shape, strides)

    def release(self) -> None:
        """Forget it here: close the descriptor, unlink a named file. The memory goes when the
        last process unmaps it (views of ``buf`` still alive keep it mapped)."""
        self.close_fd()
        if not self.memfd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / self.name)


def ensure_segment(seg: Segment | None, name: str, need: int, memfd: bool) -> Segment:
    """Return ``seg`` if it holds ``need`` bytes, else a larger replacement (``seg`` released).

    Sizes go to the next power of two (at least MIN_SEGMENT), so growth is rare and pages
    stay warm. The new segment keeps its memfd descriptor until it is handed over.
    """
    if seg is not None and seg.size >= need:
        return seg
    if seg is not None:
        seg.release()
    size = max(MIN_SEGMENT, 1 << (need - 1).bit_length())
    return Segment.create(f"{name}{next(_sids)}", size, memfd=memfd, keep_fd=True)


def send_fds(conn: Connection, fds: list[int]) -> None:
    """Send descriptors over the Unix socket under ``conn`` (right after a message)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=conn.fileno())
    try:
        socket.send_fds(sock, [b"F"], fds)
    finally:
        sock.detach()


def recv_fds(conn: Connection, count: int) -> list[int]:
    """Receive ``count`` descriptors sent by :func:`send_fds`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=conn.fileno())
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, count)
    finally:
        sock.detach()
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise EOFError(f"expected {count} descriptors, got {len(fds)}")
    return fds


_SIZE = struct.Struct("!i")  # multiprocessing.connection's frame: a length, then the bytes
_BIG_SIZE = struct.Struct("!Q")  # after a length of -1: the length of a message over 2 GiB
_ONE_WRITE = 16384  # up to this size the length and the bytes go in one write, as there


def send_message(fd: int, data: bytes) -> None:
    """Send ``data`` on ``fd`` as ``Connection.send_bytes`` does (the other end may read it
    with ``Connection.recv_bytes``), without its Python layers: one ``write`` for a small
    message. The caller holds the pipe's send lock.

    Example: ``send_message(conn.fileno(), b"ping")``.
    """
    n = len(data)
    if n <= _ONE_WRITE:
        _write_all(fd, _SIZE.pack(n) + data)
    elif n <= 0x7FFFFFFF:
        _write_all(fd, _SIZE.pack(n))
        _write_all(fd, data)
    else:
        _write_all(fd, _SIZE.pack(-1) + _BIG_SIZE.pack(n))
        _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    sent = os.write(fd, data)
    if sent < len(data):
        view = memoryview(data)
        while sent < len(data):
            sent += os.write(fd, view[sent:])


def recv_message(fd: int) -> bytes:
    """Read one message sent by :func:`send_message` or ``Connection.send_bytes`` from the
    blocking descriptor ``fd``: two ``read`` calls for a small one. Raises ``EOFError`` at
    end of file.

    Example: ``data = recv_message(conn.fileno())``.
    """
    head = os.read(fd, 4)
    if len(head) < 4:
        head = _read_rest(fd, head, 4)
    (size,) = _SIZE.unpack(head)
    if size == -1:
        (size,) = _BIG_SIZE.unpack(_read_rest(fd, b"", 8))
    data = os.read(fd, size) if size else b""
    return data if len(data) == size else _read_rest(fd, data, size)


def _read_rest(fd: int, part: bytes, size: int) -> bytes:
    buf = bytearray(part)
    while len(buf) < size:
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            raise EOFError("the other end of the pipe closed it")
        buf += chunk
    return bytes(buf)


def readable(fd: int) -> bool:
    """Whether a read of ``fd`` would return at once (data or end of file). ``poll``, not
    ``select``, which refuses descriptors from 1024 up (a server with many sockets)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def unlink_prefix(prefix: str) -> None:
    """Remove every named segment whose name starts with ``prefix``."""
    for p in SHM_DIR.glob(prefix + "*"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def sweep_stale() -> int:
    """Unlink named segments whose owner process is gone (a killed parent or worker)."""
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


def numel(shape: tuple[int, ...]) -> int:
    """How many elements a tensor of ``shape`` holds (no tensor made)."""
    n = 1
    for s in shape:
        n *= s
    return n


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` in this thread alone when both are contiguous, or dense in the same
    layout (a memcpy).

    torch's copy of a large tensor runs on the calling thread's OpenMP team, whose threads
    then spin for a while: in the parent, beside workers that need every core, that
    spinning took a third of the two-module speed-up here (a parent at torch's default
    threads, as any program that uses torch itself)."""
    if (
        src.dtype == dst.dtype
        and not src.is_conj()  # a lazy conjugate or negation is not in the bytes
        and not src.is_neg()
        and (
            (dst.is_contiguous() and src.is_contiguous())
            or (dst.stride() == src.stride() and dense_strides(src) is not None)
        )
    ):
        n = src.numel() * src.element_size()
        if n:
            ctypes.memmove(dst.data_ptr(), src.data_ptr(), n)
        return
    dst.copy_(src)


def table_bytes(table: list[tuple[int, str, tuple[int, ...]]]) -> int:
    """The bytes of the tensors a message's ``table`` places in shared memory."""
    return sum(numel(shape) * _dtype(dt).itemsize for _, dt, shape in table)


def round_up(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN` (where a segment's next tensor goes)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def as_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes, compacted, in one copy (torch alone: numpy is not a dependency).

    ``ctypes.string_at`` reads the contiguous storage directly: ~1 us, against ~30 us for
    staging through a bytearray with torch ops."""
    flat = t.contiguous()
    nbytes = flat.numel() * flat.element_size()
    return ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b""


def dense_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """The strides of ``t`` when they travel with it: ``t`` is not contiguous, but dense (its
    elements fill one span of memory from ``data_ptr``, without gaps or overlaps, in another
    order: channels_last, a transpose, a permute). Its bytes are then copied as they lie and
    the other side rebuilds the same layout, as a direct call would see it. None for a
    contiguous tensor, and for one with gaps or overlaps (a slice, an expand), which travels
    compacted: a small view never ships its base storage.

    Example: ``dense_strides(torch.zeros(2, 3).t()) == (1, 3)``."""
    if t.is_contiguous() or t.is_conj() or t.is_neg():
        return None
    strides = t.stride()
    expect = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, strides, strict=True) if n != 1):
        if stride != expect:
            return None
        expect *= size
    return strides if expect > 1 else None  # no elements: nothing to lay out


def empty(
    shape: tuple[int, ...], strides: tuple[int, ...] | None, dtype: torch.dtype
) -> torch.Tensor:
    """A new tensor of ``shape``, contiguous or laid out by ``strides``."""
    if strides is None:
        return torch.empty(shape, dtype=dtype)
    return torch.empty_strided(shape, strides, dtype=dtype)


def span_bytes(t: torch.Tensor, strides: tuple[int, ...] | None) -> bytes:
    """:func:`as_bytes`, or with ``strides`` (:func:`dense_strides`) the bytes as they lie."""
    if strides is None:
        return as_bytes(t)
    return ctypes.string_at(t.data_ptr(), t.nbytes)


REQUIRES_GRAD = 1  # a pickled tensor's flags: it requires grad
IS_PARAMETER = 2  # it is a Parameter


def rebuild(t: torch.Tensor, flags: int) -> torch.Tensor:
    """``t`` with the flags its sender recorded (:data:`REQUIRES_GRAD`, :data:`IS_PARAMETER`)."""
    if flags & IS_PARAMETER:
        return torch.nn.Parameter(t, requires_grad=bool(flags & REQUIRES_GRAD))
    return t.requires_grad_() if flags & REQUIRES_GRAD else t


def is_plain(t: torch.Tensor) -> bool:
    """A strided CPU tensor (or Parameter), not quantized or nested: its bytes are all."""
    return (
        t.layout is torch.strided
        and t.is_cpu  # not t.device.type: that builds a device object (1 us, per call)
        and not t.is_quantized
        and not getattr(t, "is_nested", False)
        and type(t) in (torch.Tensor, torch.nn.Parameter)
    )


class Outbox:
    """Pickles a message, keeping large tensors aside to copy into shared memory."""

    def __init__(self, inline_bytes: int = INLINE_BYTES) -> None:
        self.inline_bytes = inline_bytes
        self.big: list[tuple[torch.Tensor, tuple[int, ...] | None]] = []  # and its strides
        self._end = 0  # where the next large tensor goes in the segment
        # id of a tensor pickled -> its index among them, and the tensor, kept alive as
        # pickle's own memo does: a temporary (from a __reduce__) would free its id for the next
        self._seen: dict[int, tuple[int, torch.Tensor]] = {}

    def add(self, t: torch.Tensor, strides: tuple[int, ...] | None = None) -> int:
        """Keep ``t`` aside to copy into shared memory (laid out by ``strides``, from
        :func:`dense_strides`); return the offset it will have there."""
        at = self._end
        self.big.append((t.detach(), strides))
        self._end += round_up(t.numel() * t.element_size())
        return at

    def dumps(self, obj: Any) -> bytes:
        f = io.BytesIO()
        p = pickle.Pickler(f, protocol=5)
        p.persistent_id = self._persistent_id  # type: ignore[method-assign]
        p.dump(obj)
        return f.getvalue()

    def _persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or not is_plain(obj):
            return None
        # pickle's memo does not see persistent ids: a tensor met again becomes a reference
        # to the first, loaded in the same order
        seen = self._seen.get(id(obj))
        if seen is not None:
            return ("a", seen[0])
        self._seen[id(obj)] = (len(self._seen), obj)
        flags = (REQUIRES_GRAD if obj.requires_grad else 0) | (
            IS_PARAMETER if isinstance(obj, torch.nn.Parameter) else 0
        )
        t = obj.detach()
        if t.is_conj() or t.is_neg():  # lazy: not in the bytes
            t = t.resolve_conj().resolve_neg()
        strides = dense_strides(t)
        if t.nbytes <= self.inline_bytes:
            raw = span_bytes(t, strides)
            return ("i", _dtype_name(t.dtype), tuple(t.shape), raw, strides, flags)
        self.add(t, strides)
        return ("s", len(self.big) - 1, strides, flags)

    def big_bytes(self) -> int:
        return self._end

    def write(self, seg: Segment) -> list[tuple[int, str, tuple[int, ...]]]:
        """Copy the large tensors into ``seg``; return their (offset, dtype, shape) table."""
        table = []
        off = 0
        for t, strides in self.big:
            copy_into(seg.view(off, t.dtype, tuple(t.shape), strides), t)
            table.append((off, _dtype_name(t.dtype), tuple(t.shape)))
            off += round_up(t.numel() * t.element_size())
        return table


def loads(
    data: bytes,
    seg: Segment | None,
    table: list[tuple[int, str, tuple[int, ...]]],
    *,
    copy: bool,
) -> Any:
    """Unpickle a message made by :class:`Outbox`; ``copy=False`` returns views of ``seg``."""
    loaded: list[torch.Tensor] = []  # in the order the Outbox met them

    def persistent_load(pid: Any) -> torch.Tensor:
        if pid[0] == "a":
            first: int = pid[1]
            return loaded[first]
        if pid[0] == "i":
            _, dt, shape, raw, strides, flags = pid
            t = empty(shape, strides, _dtype(dt))
            if raw:
                ctypes.memmove(t.data_ptr(), raw, len(raw))
        else:
            _, index, strides, flags = pid
            off, dt, shape = table[index]
            assert seg is not None
            t = seg.view(off, _dtype(dt), shape, strides)
            if copy:
                out = empty(shape, strides, t.dtype)
                copy_into(out, t)
                t = out
        t = rebuild(t, flags)
        loaded.append(t)
        return t

    u = pickle.Unpickler(io.BytesIO(data))
    u.persistent_load = persistent_load  # type: ignore[method-assign]
    return _load(u)


def _load(u: pickle.Unpickler) -> Any:
    """``u.load()``; a class or function that this process cannot import by name becomes a
    ``SerializationError`` that says where to define it."""
    try:
        return u.load()
    except (AttributeError, ImportError) as exc:
        if isinstance(exc, AttributeError) and not str(exc).startswith("Can't get attribute"):
            raise  # not pickle's lookup of a name: the object's own code failed
        raise SerializationError(
            f"process {os.getpid()} cannot rebuild an object sent to it: {exc}. What a worker runs "
            "or returns must be importable by name in both processes; a worker imports your "
            'main script as __mp_main__ without running its `if __name__ == "__main__":` '
            "block. Define classes and functions at the top level of the script or of a "
            "module it imports, not under that block, nor in `python -c`, stdin or a "
            "notebook (or build the module in the worker: aioforward.ModuleSpec)"
        ) from exc


# ---------------------------------------------------------------------------- module weights
class ShippedModule:
    """A module pickled once, its parameters and buffers in one shared segment."""

    def __init__(self, blob: bytes, seg: Segment | None) -> None:
        self.blob = blob
        self.seg = seg

    def release(self) -> None:
        if self.seg is not None:
            self.seg.release()
            self.seg = None


def ship_module(
    module: torch.nn.Module, seg_name: str, max_bytes: int | None, memfd: bool = MEMFD
) -> ShippedModule:
    """Pickle ``module`` with its weights placed in a new shared segment (one copy for all)."""
    places: dict[tuple[int, int], int] = {}  # (data_ptr, nbytes) of a storage -> offset
    storages: list[tuple[int, torch.UntypedStorage]] = []
    size = 0
    for t in [*module.parameters(), *module.buffers()]:
        if not is_plain(t):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in places and st.nbytes() > 0:
            places[key] = size
            storages.append((size, st))
            size += round_up(st.nbytes())
    seg = None
    if size:
        check_room(size, max_bytes, memfd)
        seg = Segment.create(seg_name, max(size, ALIGN), memfd=memfd, keep_fd=True)
        for off, st in storages:
            src = torch.empty(0, dtype=torch.uint8).set_(st)
            seg.view(off, torch.uint8, (st.nbytes(),)).copy_(src)

    def persistent_id(obj: Any) -> Any:
        if not isinstance(obj, torch.Tensor) or not is_plain(obj):
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
            seg.release()
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
    module = _load(u)
    assert isinstance(module, torch.nn.Module)
    return module


def check_room(size: int, max_bytes: int | None, memfd: bool = MEMFD) -> None:
    """Raise SerializationError (bytes needed and free) when ``size`` cannot be placed."""
    if max_bytes is not None and size > max_bytes:
        raise SerializationError(
            f"not enough shared memory: {size} bytes needed, the pool's shm_limit allows "
            f"{max_bytes}; raise shm_limit or send smaller tensors"
        )
    free = shm_free_bytes(memfd)
    if size > free:
        where = "memory" if memfd else str(SHM_DIR)
        raise SerializationError(
            f"not enough shared memory: {size} bytes needed in {where}, {free} free; "
            "free memory, enlarge /dev/shm or send smaller tensors"
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
