"""glibc heap setting for the long-running node process (a no-op elsewhere).

glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB); from then on
blocks of that size come from the heap arena of whichever thread asks. The node allocates tens of MB
per ~/query and purification on executor threads while its worker thread fuses frames, so those
per-thread arenas fragment and are never returned: RSS grew by ~250 MB per 1000 frames with queries
(bench/bench_soak.py) and plateaued with a fixed threshold. Setting the threshold explicitly also
turns the dynamic adjustment off, so large blocks stay mmapped and go back to the OS when freed.

The threshold is 32 MiB (glibc's own upper bound), not lower: every mmapped block is fresh, zeroed pages,
and with a 1 MiB threshold each feature-network activation (5-15 MB at 448x320) was page-faulted in anew
on every frame, making the node's frames 4-8x slower than the same code offline (bench/bench_replay.py).
Against fragmentation at 32 MiB the node caps the heap arenas at 2 (M_ARENA_MAX: blocks freed by one thread
are reused by the others instead of stranding in per-thread arenas) and hands free fragments back with
`trim()` (glibc malloc_trim, every arena) on a timer. Soak (bench/bench_soak.py, lseg): flat without queries;
with a new query text every 2 frames flat once the bounded text caches are full (numbers in docs/NODE.md).

The trim threshold is raised too (M_TRIM_THRESHOLD, 64 MiB: a frame's working set). At glibc's default (128 kB)
every free that leaves the top of an arena empty gives those pages back at once, so each frame's activations were
faulted in anew: 4,000-13,500 minor page faults and 14-41 ms of kernel time per lseg frame on one thread (getrusage;
~0 with the raised threshold). Returning the rest is `trim()`'s job, on its timer. 512 MiB also stopped the faults
but let RSS creep in a 600-frame soak (+59 MB after warm-up); at 64 MiB the soak is flat, ~60 MB above the old
plateau (the retained arena tops).
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1          # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 32 << 20  # map-sized tensors are mmapped (returned when freed); activations come from the heap
TRIM_THRESHOLD_BYTES = 64 << 20  # freed arena tops up to a frame's working set stay mapped; trim() hands them back
ARENA_MAX = 2
TRIM_PERIOD_S = 10.0             # how often the node hands free heap pages back (malloc_trim takes ~1 ms)


def configure(nbytes: int = MMAP_THRESHOLD_BYTES, arenas: int = ARENA_MAX, trim_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold, raise its trim threshold and cap its arenas; False where this is not glibc or
    MALLOC_MMAP_THRESHOLD_ already pins it (MALLOC_ARENA_MAX / MALLOC_TRIM_THRESHOLD_ in the environment are
    likewise left alone). For processes that map frame after frame: the node, and the tools and benchmarks that
    measure what it does."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, int(arenas))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def trim() -> bool:
    """Return free heap pages of every arena to the OS (glibc malloc_trim); False where this is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
