"""relu2dlgn.utils.memory: freed memory kept in the process, observed through the page faults of reallocating it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, torch
    from relu2dlgn.utils.memory import retain_freed_memory

    def faults_per_cycle():
        for _ in range(2):  # warm-up: the first cycle faults the memory in in any case
            torch.empty(3 << 20).fill_(1.0)
        faults = []
        for _ in range(7):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            torch.empty(3 << 20).fill_(1.0)  # 12 MiB, written: every page touched
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sorted(faults)[3]  # the median cycle: another thread's allocation can move the block once

    plain = faults_per_cycle()
    applied = retain_freed_memory()
    print(plain, applied, retain_freed_memory(), faults_per_cycle())
""")


def _glibc_small_pages() -> bool:
    """glibc, and transparent huge pages not forced on every mapping (they would fault 2 MiB at a time)."""
    if not sys.platform.startswith("linux") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" not in f.read()
    except OSError:
        return True


@pytest.mark.skipif(not _glibc_small_pages(), reason="glibc malloc with 4 KiB page faults only")
def test_retain_freed_memory_stops_refaulting_reallocated_blocks():
    """Under glibc's static default thresholds (128 KiB: every large block its own mmap) each 12 MiB tensor is
    faulted in again page by page; after retain_freed_memory() (idempotent) the freed block is reused."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
    plain, applied, again, retained = out.stdout.split()
    pages = (12 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert float(plain) > 0.9 * pages
    assert applied == again == "True"
    assert float(retained) < 0.05 * pages
