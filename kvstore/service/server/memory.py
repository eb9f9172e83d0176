"""Allocator settings for the kv-server process, where stored values are the memory.

Every received block lands in a new buffer and every replaced or evicted one is freed, so
glibc's defaults hurt: blocks above its adaptive mmap threshold (128 KiB at first) get
mmap'd and munmap'd one by one, and freed heap memory above the trim threshold goes back
to the kernel, so the next block faults every page in again. Which regime a block falls in
depends on the sizes freed before it. Measured on the 2-core dev machine: a 256 KiB-block
put stream ran at 1.0-1.3 GB/s after 160 KiB blocks had come and gone, and at 2.0-2.3 GB/s
with the thresholds pinned as here (Redis avoids the same churn with jemalloc).
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit: blocks up to this come from the heap
TRIM_THRESHOLD = 512 << 20  # free memory kept for the next blocks before returning it


def keep_block_memory_for_reuse() -> bool:
    """Pin glibc's thresholds (process-wide: call it only in the server process); False
    where the C library is not glibc, which is harmless."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
