"""Binary frames for the common small call: a shipped module applied to a few small plain
tensors, and a reply that is one small plain tensor.

Such a call skips pickle on both sides (a pickled call runs the pickler's Python callback
for every object, and unpickling a message looks its class up by name): a fixed
little-endian header, then each tensor as its dtype code, shape and bytes. A pickle
(protocol 2 and above) starts with ``0x80``, so the first byte tells a frame from a pickled
message. Everything else (keyword arguments, large tensors in shared memory, module loads,
streams) travels pickled as before.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import torch

from ._transport import as_bytes, is_plain

CALL = 0x01  # parent -> worker: seq, module key, then the argument tensors
REPLY = 0x02  # worker -> parent: compute seconds, then the result tensor

_CALL_HEAD = struct.Struct("<Bqqq")  # tag, seq, module key (id, version); then the args
_COUNT = struct.Struct("<B")  # the args section: how many tensors, then each
_REPLY_HEAD = struct.Struct("<Bd")  # tag, compute_s
_TENSOR_HEAD = struct.Struct("<BB")  # dtype code, ndim
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


def plain_small(t: Any, limit: int) -> bool:
    """Whether ``t`` can travel in a frame: an ordinary CPU tensor of a listed dtype, at
    most ``limit`` bytes, with no lazy conjugate or negation."""
    return _code(t, limit) is not None


def _code(t: Any, limit: int) -> int | None:
    """The dtype code of ``t`` if it passes :func:`plain_small`, else None."""
    if type(t) is not torch.Tensor:  # a Parameter is pickled, to keep its type
        return None
    code = _CODES.get(t.dtype)
    if code is None or not is_plain(t) or t.nbytes > limit or t.is_conj() or t.is_neg():
        return None
    return code


def _pack_small(t: Any, limit: int, out: list[bytes]) -> bool:
    """Append ``t`` to ``out`` (its dtype code, shape and bytes) if it passes
    :func:`plain_small`; return whether it did. Checked and packed at once: this runs for
    every argument and every result of the common small call."""
    code = _code(t, limit)
    if code is None:
        return False
    shape = t.shape
    out.append(_TENSOR_HEAD.pack(code, len(shape)))
    out.append(_SHAPES[len(shape)].pack(*shape))
    out.append(as_bytes(t))  # its bytes: no need to detach it from autograd first
    return True


def encode_small(args: tuple[Any, ...], limit: int) -> bytes | None:
    """The args section of a call whose arguments all pass :func:`plain_small` (at most 255
    of them), else None."""
    if len(args) > 255:
        return None
    out = [_COUNT.pack(len(args))]
    for t in args:
        if not _pack_small(t, limit, out):
            return None
    return b"".join(out)


def _unpack(data: bytes, base: int, off: int) -> tuple[torch.Tensor, int]:
    """The tensor at ``off`` in ``data`` (whose bytes start at address ``base``), copied
    into memory of its own: torch's allocator aligns it, as its kernels expect."""
    code, ndim = _TENSOR_HEAD.unpack_from(data, off)
    off += _TENSOR_HEAD.size
    shape = _SHAPES[ndim].unpack_from(data, off)
    off += _SHAPES[ndim].size
    dtype = _DTYPES[code]
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * dtype.itemsize
    if off + nbytes > len(data):
        raise ValueError(f"a frame of {len(data)} bytes ends inside a tensor")
    if nbytes:
        ctypes.memmove(t.data_ptr(), base + off, nbytes)
    return t, off + nbytes


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


def read_args(data: bytes, off: int = 0) -> tuple[torch.Tensor, ...]:
    """The tensors of an args section at ``off`` in ``data``."""
    base = _address(data)
    (count,) = _COUNT.unpack_from(data, off)
    off += _COUNT.size
    args = []
    for _ in range(count):
        t, off = _unpack(data, base, off)
        args.append(t)
    return tuple(args)


def call_frame(seq: int, key: tuple[int, int], args: bytes) -> bytes:
    """A whole call: ``args`` from :func:`encode_small`."""
    return _CALL_HEAD.pack(CALL, seq, key[0], key[1]) + args


def read_call(data: bytes) -> tuple[int, tuple[int, int], tuple[torch.Tensor, ...]]:
    """``(seq, module key, args)`` of a call frame."""
    _, seq, k0, k1 = _CALL_HEAD.unpack_from(data)
    return seq, (k0, k1), read_args(data, _CALL_HEAD.size)


def reply_frame(compute_s: float, result: Any, limit: int) -> bytes | None:
    """The reply of a call whose result passes :func:`plain_small`, else None."""
    out = [_REPLY_HEAD.pack(REPLY, compute_s)]
    return b"".join(out) if _pack_small(result, limit, out) else None


def read_reply(data: bytes) -> tuple[float, torch.Tensor]:
    """``(compute_s, result)`` of a reply frame."""
    _, compute_s = _REPLY_HEAD.unpack_from(data)
    result, _ = _unpack(data, _address(data), _REPLY_HEAD.size)
    return compute_s, result
