"""Keeping freed memory inside the process during a CPU training job (glibc malloc).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc hands large freed blocks back to the operating
system (``munmap``, or trimming the top of the heap), so the next step's tensors of the same sizes are faulted
in again page by page, each page zeroed by the kernel. A DLGN step frees and reallocates more large temporaries
than its source network's (the teacher's forward, the soft gates): measured on the 2-core AMD EPYC VM (resnet18,
64 px, batch 32, one thread) a distillation step took ~7,500 minor page faults, about 15 ms of its ~465 ms,
where the source's step took none; with freed memory kept it took ~400, and the step ratio went from 2.64x to
2.56x (``benchmarks/train_step.py --malloc default`` measures the difference).

:func:`retain_freed_memory` raises glibc's trim threshold (free memory kept at the top of the heap before it is
returned) to 1 GiB and fixes the mmap threshold (blocks served by their own ``mmap``, returned on ``free``) at
its maximum, 32 MiB: what ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_`` would set at start-up. It
lasts for the rest of the process — glibc cannot restore its adaptive thresholds — and does not raise the peak
(resident high-water mark): memory freed at the peak is kept for reuse instead of returned and taken again.
Other C libraries (and other systems) are left alone.
"""
from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

TRIM_THRESHOLD = 1 << 30
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_applied = False


def retain_freed_memory() -> bool:
    """Keep freed memory in the process for its remaining lifetime (see the module docstring). Returns whether
    glibc's thresholds are now set; ``False`` (and nothing changed) where the C library is not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if _applied:
        log.info("glibc malloc keeps freed memory for this process (trim threshold %d MiB, mmap threshold %d MiB)",
                 TRIM_THRESHOLD >> 20, MMAP_THRESHOLD >> 20)
    return _applied
