"""glibc malloc settings that keep forward-pass latency stable."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["MALLOC_ENV", "keep_freed_memory"]

# glibc returns large freed blocks to the kernel; a conv net then page-faults its
# activations again on every forward (measured here: two conv nets on threads 27-32 ms
# per round by default, 15 ms with these settings). Keep freed memory for reuse instead.
MMAP_THRESHOLD = 1 << 30  # allocations below 1 GiB come from the heap, not fresh mmaps
TRIM_THRESHOLD = 1 << 31  # do not give the heap's top back to the kernel below 2 GiB free
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt, <malloc.h>


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed memory for reuse in this process.

    Process-wide and permanent: all threads share one malloc arena and the process
    keeps up to 2 GiB of freed heap rather than returning it to the kernel, which
    keeps tensor allocations warm (large results copied out of a ``ProcessPool``,
    activations of memory-bound modules on a ``ThreadPool``). Worker
    processes of a ``ProcessPool`` get the same settings through their environment;
    call this yourself before using a ``ThreadPool`` for memory-bound modules.
    Returns False where the C library is not glibc::

        aioforward.keep_freed_memory()
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # One arena for all threads: a thread's own arena holds at most 64 MiB per heap, so
    # its large tensors (a pool's supervisor copying results out, ThreadPool threads)
    # would be fresh, page-faulted mmaps on every call whatever the thresholds say
    # (measured here: a 64 MiB copy-out took 50 ms in a thread, 5 ms with one arena).
    return (
        bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        and bool(mallopt(_M_ARENA_MAX, 1))
    )
