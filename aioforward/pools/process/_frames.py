"""Binary frames for the common call: a shipped module applied to plain tensors, with
keyword arguments that are plain tensors or simple values, and a reply that is a plain
tensor, or a tuple or list of them.

Such a call skips pickle on both sides (a pickled call runs the pickler's Python callback
for every object, and unpickling a message looks its class up by name): a fixed
little-endian header, then each tensor as its dtype code and flags, its shape, its strides
when it is dense in another layout than contiguous (channels_last, a transpose), then its
bytes inline (at most the pool's ``inline_bytes``) or, for a larger one, its offset in shared
memory: the worker's request segment for arguments, its response segment for a result, both
already mapped on the other side. A value that is not a tensor (None, a bool, an int, a
float, a tuple or list) takes a tensor head's place with a code no dtype has. A pickle
(protocol 2 and above) starts with ``0x80``, so the first byte tells a frame from a pickled
message. Everything else (other values, a tensor named twice, a segment the other side has
not mapped yet, module loads, streams) travels pickled.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import torch

from ._transport import (
    Outbox,
    Segment,
    as_bytes,
    copy_into,
    dense_strides,
    empty,
    is_plain,
    numel,
    round_up,
    span_bytes,
)

CALL = 0x01  # parent -> worker: seq, module key, then the args section
REPLY = 0x02  # worker -> parent: compute seconds, where the result lies, then the result

_CALL_HEAD = struct.Struct("<Bqqq")  # tag, seq, module key (id, version); then the args
_COUNT = struct.Struct("<B")  # the args section: how many tensors, each; how many keywords,
# each as its name and its value
_REPLY_HEAD = struct.Struct("<Bdqq")  # tag, compute_s, response segment's sid (or -1), and
# how many of its bytes the result occupies (0: all inline)
_TENSOR_HEAD = struct.Struct("<BB")  # dtype code | flags, ndim; the shape follows
_SHARED_AT = struct.Struct("<q")  # after the shape (and strides) of a SHARED tensor: its offset
SHARED = 0x80  # a dtype code's flag: the tensor's bytes lie in a segment, not in the frame
STRIDED = 0x40  # its strides follow its shape, and its bytes lie in that layout
GRAD = 0x20  # it requires grad
_DTYPE = 0x1F  # the dtype code itself
# Values that are not tensors (in a result, in keyword arguments), in a tensor head's place:
# (code, item count or a bool's value); an int or a float's 8 bytes follow.
_FLOAT, _INT, _BOOL, _TUPLE, _LIST, _NONE = range(0x1A, 0x20)  # no dtype's code, no flag
_INT_VALUE = struct.Struct("<q")
_FLOAT_VALUE = struct.Struct("<d")
_NAME = struct.Struct("<B")  # a keyword's length in bytes; its UTF-8 follows
_NO_KEYWORDS = _COUNT.pack(0)
_SCALARS = (type(None), bool, int, float)  # the values besides tensors a frame carries
_MAX_NODES = 256  # a larger result is pickled
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
)
_CODES = {dt: i for i, dt in enumerate(_DTYPES)}
_SHAPES = [struct.Struct(f"<{n}q") for n in range(256)]  # by ndim


def _code(t: Any) -> int | None:
    """The dtype code of ``t`` if it can travel in a frame (any size), else None."""
    if type(t) is not torch.Tensor:  # a Parameter is pickled, to keep its type
        return None
    code = _CODES.get(t.dtype)
    if code is None or not is_plain(t) or t.is_conj() or t.is_neg():
        return None
    return code


def _head(code: int, t: torch.Tensor, out: list[bytes]) -> tuple[int, ...] | None:
    """Append the head of ``t`` (``code`` may carry SHARED); return its strides where they
    travel (:func:`dense_strides`)."""
    if t.requires_grad:
        code |= GRAD
    shape = t.shape
    packer = _SHAPES[len(shape)]
    if t.is_contiguous() or (strides := dense_strides(t)) is None:
        out.append(_TENSOR_HEAD.pack(code, len(shape)))
        out.append(packer.pack(*shape))
        return None
    out.append(_TENSOR_HEAD.pack(code | STRIDED, len(shape)))
    out.append(packer.pack(*shape))
    out.append(packer.pack(*strides))
    return strides


def encode_small(
    args: tuple[Any, ...], limit: int, kwargs: dict[str, Any] | None = None
) -> tuple[bytes, Outbox | None] | None:
    """The args section of a call whose arguments are all plain tensors (at most 255 of
    them), and whose keyword arguments are plain tensors, None, bools, ints or floats, else
    None; with the :class:`Outbox` of the tensors over ``limit`` bytes, which
    ``Outbox.write`` places at the offsets the section names (None when all are inline).
    Checked and packed at once: this runs for every call."""
    n = len(args)
    if kwargs:
        if len(kwargs) > 255:
            return None
        ts = list(args)
        for v in kwargs.values():
            if type(v) is torch.Tensor:
                ts.append(v)
            elif type(v) not in _SCALARS:
                return None  # seen before any bytes are copied
        if len(ts) > 1 and len(set(map(id, ts))) < len(ts):
            return None  # a tensor passed twice is pickled, to arrive as one tensor
    elif n > 1 and len(set(map(id, args))) < n:
        return None
    if n > 255:
        return None
    out = [_COUNT.pack(n)]
    box: Outbox | None = None
    for t in args:
        code = _code(t)
        if code is None:
            return None
        if t.nbytes <= limit:
            strides = _head(code, t, out)
            out.append(as_bytes(t) if strides is None else span_bytes(t, strides))
        else:
            box = _put(t, code, limit, out, box)
    if not kwargs:
        out.append(_NO_KEYWORDS)
        return b"".join(out), box
    out.append(_COUNT.pack(len(kwargs)))
    for name, v in kwargs.items():
        try:
            raw = name.encode()
        except UnicodeEncodeError:  # a lone surrogate
            return None
        if len(raw) > 255:
            return None
        out.append(_NAME.pack(len(raw)))
        out.append(raw)
        if type(v) is torch.Tensor:
            code = _code(v)
            if code is None:
                return None
            box = _put(v, code, limit, out, box)
        elif not _scalar(v, out):
            return None
    return b"".join(out), box


def _put(
    t: torch.Tensor, code: int, limit: int, out: list[bytes], box: Outbox | None
) -> Outbox | None:
    """Append argument ``t``: inline, or its offset in the request segment (``box``, made on
    the first large one, places it there)."""
    if t.nbytes <= limit:
        strides = _head(code, t, out)
        out.append(span_bytes(t, strides))  # no need to detach it from autograd first
        return box
    if box is None:
        box = Outbox(limit)
    strides = _head(code | SHARED, t, out)
    out.append(_SHARED_AT.pack(box.add(t, strides)))
    return box


def _scalar(v: Any, out: list[bytes]) -> bool:
    """Append ``v`` if it is None, a bool, an int of 64 bits or a float; say whether it was."""
    if v is None:
        out.append(_TENSOR_HEAD.pack(_NONE, 0))
    elif type(v) is bool:
        out.append(_TENSOR_HEAD.pack(_BOOL, v))
    elif type(v) is int and -(1 << 63) <= v < 1 << 63:
        out.append(_TENSOR_HEAD.pack(_INT, 0))
        out.append(_INT_VALUE.pack(v))
    elif type(v) is float:
        out.append(_TENSOR_HEAD.pack(_FLOAT, 0))
        out.append(_FLOAT_VALUE.pack(v))
    else:
        return False
    return True


def _unpack(
    data: bytes, base: int, off: int, seg: Segment | None, copy: bool
) -> tuple[torch.Tensor, int]:
    """The tensor at ``off`` in ``data`` (whose bytes start at address ``base``): an inline
    one copied into memory of its own (torch's allocator aligns it, as its kernels expect);
    a SHARED one viewed in ``seg``, or copied out of it with ``copy``."""
    code, ndim = _TENSOR_HEAD.unpack_from(data, off)
    off += _TENSOR_HEAD.size
    shapes = _SHAPES[ndim]
    shape = shapes.unpack_from(data, off)
    off += shapes.size
    strides = None
    if code & STRIDED:
        strides = shapes.unpack_from(data, off)
        off += shapes.size
    dtype = _DTYPES[code & _DTYPE]
    if code & SHARED:
        (at,) = _SHARED_AT.unpack_from(data, off)
        off += _SHARED_AT.size
        nbytes = numel(shape) * dtype.itemsize
        if seg is None or at < 0 or at + nbytes > seg.size:
            raise ValueError(f"a frame names {nbytes} bytes at {at} outside shared memory")
        t = seg.view(at, dtype, shape, strides)
        if copy:
            out = empty(shape, strides, dtype)
            copy_into(out, t)
            t = out
    else:
        t = empty(shape, strides, dtype)
        nbytes = t.nbytes
        if off + nbytes > len(data):
            raise ValueError(f"a frame of {len(data)} bytes ends inside a tensor")
        if nbytes:
            ctypes.memmove(t.data_ptr(), base + off, nbytes)
        off += nbytes
    return (t.requires_grad_() if code & GRAD else t), off


def _buffer_address(data: bytes) -> int:
    """Where the bytes of ``data`` lie (a bytes object's own buffer: no copy)."""
    address = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    assert address is not None
    return address


def _bytes_offset() -> int | None:
    """How far a bytes object's buffer lies from the object's ``id``: a constant in CPython
    (its object header), found once here; None where ``id`` is not an address."""
    probes = [bytes(range(n, n + 40)) for n in range(4)]
    offsets = {_buffer_address(p) - id(p) for p in probes}
    return offsets.pop() if len(offsets) == 1 else None


_OFFSET = _bytes_offset()


def _address(data: bytes) -> int:
    """Where the bytes of ``data`` lie: ``id`` plus the header (0.05 us), else by ctypes (0.5
    us), per call on both sides of a frame."""
    return id(data) + _OFFSET if _OFFSET is not None else _buffer_address(data)


def read_args(
    data: bytes, off: int = 0, seg: Segment | None = None
) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    """The arguments and keyword arguments of an args section at ``off`` in ``data``; the
    large tensors are views of ``seg``, the request segment (no copy: the call runs on them
    there)."""
    base = _address(data)
    count = data[off]  # a count is one byte (_COUNT)
    off += 1
    args = []
    for _ in range(count):
        t, off = _unpack(data, base, off, seg, copy=False)
        args.append(t)
    count = data[off]
    if not count:
        return tuple(args), {}
    off += 1
    kwargs = {}
    for _ in range(count):
        (n,) = _NAME.unpack_from(data, off)
        off += _NAME.size
        name = data[off : off + n].decode()
        kwargs[name], off = _read_node(data, base, off + n, seg, copy=False)
    return tuple(args), kwargs


def call_frame(seq: int, key: tuple[int, int], args: bytes) -> bytes:
    """A whole call: ``args`` from :func:`encode_small`."""
    return _CALL_HEAD.pack(CALL, seq, key[0], key[1]) + args


def read_call(
    data: bytes, seg: Segment | None = None
) -> tuple[int, tuple[int, int], tuple[torch.Tensor, ...], dict[str, Any]]:
    """``(seq, module key, args, kwargs)`` of a call frame (large tensors: views of ``seg``)."""
    _, seq, k0, k1 = _CALL_HEAD.unpack_from(data)
    return seq, (k0, k1), *read_args(data, _CALL_HEAD.size, seg)


def reply_frame(
    compute_s: float, result: Any, limit: int, seg: Segment | None = None
) -> bytes | None:
    """The reply of a call whose result is one plain tensor, or a tuple or list (nested, with
    None among them) of distinct plain tensors: each inline up to ``limit`` bytes, else copied
    into ``seg`` (the worker's response segment, which the parent has mapped) when they all
    fit there; None otherwise (the result is pickled, in an ``Ok``)."""
    if type(result) is not torch.Tensor:  # tuple and list only: a NamedTuple keeps its class
        if type(result) is not tuple and type(result) is not list:
            return None
        out: list[bytes] = []
        state = _Placing(limit, seg)
        try:
            state.node(result, out, 0)
        except _Unframed:
            return None  # before any copy: the pickled reply copies each tensor once
        for dst, src in state.copies:
            copy_into(dst, src.detach())
        sid = seg.sid if seg is not None and state.at else -1
        return _REPLY_HEAD.pack(REPLY, compute_s, sid, state.at) + b"".join(out)
    code = _code(result)
    if code is None:
        return None
    nbytes = result.nbytes
    if nbytes <= limit:
        out = [_REPLY_HEAD.pack(REPLY, compute_s, -1, 0)]
        strides = _head(code, result, out)
        out.append(span_bytes(result, strides))
    elif seg is not None and nbytes <= seg.size:
        out = [_REPLY_HEAD.pack(REPLY, compute_s, seg.sid, nbytes)]
        strides = _head(code | SHARED, result, out)
        out.append(_SHARED_AT.pack(0))
        copy_into(seg.view(0, result.dtype, tuple(result.shape), strides), result.detach())
    else:
        return None
    return b"".join(out)


class _Unframed(Exception):
    """The result cannot travel in a frame: it is pickled."""


class _Placing:
    """Encodes a result of several tensors: where the next large one goes in the segment,
    which tensors it holds already (one met twice is pickled, to arrive as one), how many
    nodes it has."""

    def __init__(self, limit: int, seg: Segment | None) -> None:
        self.limit = limit
        self.seg = seg
        self.at = 0
        self.seen: set[int] = set()
        self.nodes = 0
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # into the segment, at end

    def node(self, value: Any, out: list[bytes], depth: int) -> None:
        self.nodes += 1
        if self.nodes > _MAX_NODES or depth > 16:
            raise _Unframed
        if type(value) is torch.Tensor:
            code = _code(value)
            if code is None or id(value) in self.seen:
                raise _Unframed
            self.seen.add(id(value))
            if value.nbytes <= self.limit:
                out.append(span_bytes(value, _head(code, value, out)))
                return
            seg, at = self.seg, self.at
            if seg is None or at + value.nbytes > seg.size:
                raise _Unframed
            strides = _head(code | SHARED, value, out)
            out.append(_SHARED_AT.pack(at))
            self.copies.append((seg.view(at, value.dtype, tuple(value.shape), strides), value))
            self.at = round_up(at + value.nbytes)
        elif _scalar(value, out):
            pass
        elif (type(value) is tuple or type(value) is list) and len(value) <= 255:
            out.append(_TENSOR_HEAD.pack(_TUPLE if type(value) is tuple else _LIST, len(value)))
            for v in value:
                self.node(v, out, depth + 1)
        else:
            raise _Unframed


def _read_node(
    data: bytes, base: int, off: int, seg: Segment | None, copy: bool = True
) -> tuple[Any, int]:
    """The value at ``off``: a tensor (see :func:`_unpack` for ``copy``), a scalar, None, or a
    tuple or list of such values."""
    code = data[off]
    if code < _FLOAT or code > _NONE:
        return _unpack(data, base, off, seg, copy)
    count = data[off + 1]
    off += _TENSOR_HEAD.size
    if code == _NONE:
        return None, off
    if code == _BOOL:
        return bool(count), off
    if code == _INT:
        return _INT_VALUE.unpack_from(data, off)[0], off + _INT_VALUE.size
    if code == _FLOAT:
        return _FLOAT_VALUE.unpack_from(data, off)[0], off + _FLOAT_VALUE.size
    items = []
    for _ in range(count):
        item, off = _read_node(data, base, off, seg, copy)
        items.append(item)
    return (tuple(items) if code == _TUPLE else items), off


def reply_shared_bytes(data: bytes) -> int:
    """How many bytes of shared memory a reply frame's result occupies (0: inline)."""
    return int(_REPLY_HEAD.unpack_from(data)[3])


def read_reply(data: bytes, seg: Segment | None = None) -> tuple[float, Any]:
    """``(compute_s, result)`` of a reply frame; large tensors are copied out of ``seg``,
    which must be the segment the worker wrote them to."""
    _, compute_s, sid, _ = _REPLY_HEAD.unpack_from(data)
    if sid != -1 and (seg is None or seg.sid != sid):
        raise ValueError(f"a reply frame names segment {sid}, which this process has not mapped")
    result, _ = _read_node(data, _address(data), _REPLY_HEAD.size, seg)
    return compute_s, result
