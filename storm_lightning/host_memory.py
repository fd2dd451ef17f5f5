"""Keep freed host memory in the process during CPU training (glibc only).

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block over its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` on free, so each large activation costs
a page fault per 4 KiB page the first time it is written, every step. The selective scan's
(K, b, chunks, d_inner, d_state) intermediates are 67 MB each for 8 32-frame clips of the tiny default:
measured on the 2-core development machine (``benchmarks/bench_train_step.py``), a training step of
16 such clips took 1.1 million page faults, 1.65 s in the kernel and 2.5 s wall; with the two settings
below, 3 300 faults, 0.04 s and 1.4 s (the default mix: 0.85 s -> 0.66 s).

The cost is that the process keeps its peak heap for its lifetime instead of shrinking after a
spike, which is what a training process does anyway. GPU runs keep glibc's defaults: there the large
host blocks are one-off (loading a checkpoint) and should go back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
OPT_OUT = "STORM_KEEP_FREED_MEMORY"  # set to 0 to keep glibc's defaults


def keep_freed_memory() -> bool:
    """Serve large blocks from the heap (no mmap) and never trim it; True if glibc took both settings.

    Affects allocations made after the call, in this process and the processes it forks (data
    workers). A no-op returning False off Linux/glibc or with ``STORM_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
