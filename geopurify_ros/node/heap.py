"""glibc heap setting for the long-running node process (a no-op elsewhere).

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB); from then on
blocks of that size come from the heap arena of whichever thread asks. The node allocates tens of MB
per ~/query and purification on executor threads while its worker thread fuses frames, so those
per-thread arenas fragment and are never returned: RSS grew by ~250 MB per 1000 frames with queries
(bench/bench_soak.py) and plateaued with a fixed threshold. Setting the threshold explicitly also
turns the dynamic adjustment off, so large blocks stay mmapped and go back to the OS when freed.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_MMAP_THRESHOLD = -3          # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20  # 1 MiB: camera images and map-sized tensors are mmapped; small objects are not


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold; False where this is not glibc or MALLOC_MMAP_THRESHOLD_ already pins it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
