"""host_memory.keep_freed_memory: after it, a large tensor allocated and freed every step stops costing
page faults (the CPU training speed-up); before it, every allocation faults its pages in again."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
PAGES = 16 * 2**20 * 4 // 4096  # 4 KiB pages of one 64 MiB temporary

PROGRAM = """
import resource, sys, torch
from storm_lightning.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
x = torch.randn(16 * 2**20)  # 64 MiB, over glibc's largest mmap threshold
def step():  # two 64 MiB temporaries, freed at once, as activations are
    y = (x * 2).exp_()
    return float((y + x)[0])
for _ in range(10):  # warm up: the heap grows to the workload's peak once
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    applied, kept = _faults("keep")
    if applied != "True":
        pytest.skip("not glibc: mallopt unavailable")
    _, default = _faults("default")
    assert default > 20 * PAGES  # glibc's default: both temporaries come back from the OS every step
    # kept: reused (one temporary faulting in once more, seen once in about 20 runs, is still 20x fewer)
    assert kept < 2 * PAGES


def test_opt_out_keeps_glibc_defaults():
    applied, faults = _faults("keep", STORM_KEEP_FREED_MEMORY="0")
    assert applied == "False" and faults > 20 * PAGES
