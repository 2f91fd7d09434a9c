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

assert heap.fix_mmap_threshold(), "mallopt refused the settings"
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
    code = "from geopurify_ros.node import heap; import sys; sys.exit(0 if heap.fix_mmap_threshold() is False else 4)"
    env = {"MALLOC_MMAP_THRESHOLD_": "1048576", "PATH": "/usr/bin:/bin"}
    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "VIRTUAL_ENV", "HOME")})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
