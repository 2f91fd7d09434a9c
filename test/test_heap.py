"""node/heap.py: glibc accepts the node's heap settings, and trimming hands freed pages back."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

CHILD = r"""
import os, sys
from geopurify_ros.node import heap

def rss_mb():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS")) / 1024

assert heap.configure(), "mallopt refused the settings"
# 2,000 blocks of 200 kB come from the heap (below the 32 MiB threshold); keeping every 10th alive pins the
# heap top, so freeing the others leaves ~360 MB of free but resident fragments that only trim() returns.
blocks = [bytearray(200_000) for _ in range(2000)]
keep = blocks[::10]
del blocks
freed = rss_mb()
heap.trim()
trimmed = rss_mb()
print(freed, trimmed)
sys.exit(0 if freed - trimmed > 200 else 3)
"""


def test_settings_are_accepted_and_trim_returns_free_fragments():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_environment_settings_take_precedence():
    code = "from geopurify_ros.node import heap; import sys; sys.exit(0 if heap.configure() is False else 4)"
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "VIRTUAL_ENV", "HOME")})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr


FAULTS = r"""
import resource, sys
from geopurify_ros.node import heap

assert heap.configure(trim_bytes=int(sys.argv[1]))
block = 20_000_000                       # a frame's activations: under the mmap threshold, from the heap
for _ in range(3):
    x = bytearray(block); del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    x = bytearray(block); del x          # bytearray zero-fills: touches every page
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20 / (block / 4096))
"""


def test_raised_trim_threshold_stops_refaulting_each_frame():
    """With glibc's default trim threshold a freed heap top goes back to the OS at once and the next frame faults
    every page in again; with the node's setting the pages stay mapped until trim() (fraction of the block's
    pages faulted per iteration)."""
    def refaulted(trim_bytes: int) -> float:
        out = subprocess.run([sys.executable, "-c", FAULTS, str(trim_bytes)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        return float(out.stdout.split()[-1])

    from geopurify_ros.node import heap

    assert refaulted(heap.TRIM_THRESHOLD_BYTES) < 0.05
    assert refaulted(128 * 1024) > 0.5                          # glibc's default: every page, every time
