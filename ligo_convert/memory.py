"""Returning freed memory to the system.

glibc serves allocations below its mmap threshold from the heap, and raises that threshold (up to 32 MB) each time a
large block is freed; a layer-sized buffer freed during streamed fitting then stays in the process as reusable heap
instead of going back to the system, and the peak RSS of a grow measured 1.7x its live tensors
(benchmarks/fit_scale.py).  A fixed threshold keeps every tensor of 256 KB or more in its own mapping, returned to the
system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024
_done = False


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold (once per process); True when it took effect (False off glibc, e.g. macOS)."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _done
