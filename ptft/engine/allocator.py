"""Keep freed memory in the process when training on a CPU (glibc's malloc).

A training step allocates and frees the same activation-sized buffers (a few MiB to tens of
MiB each) every step. By default glibc serves such blocks with fresh mmap()s and, when they are
freed, hands the memory back to the kernel (munmap, heap trimming), so the next step pays a page
fault for every 4 KiB it touches again. That cost shows up as slow matmuls into new outputs
(measured here: a 4096 x 8192 fp32 product at 114 GFLOP/s into a new tensor, 193 into a reused
one) and as about 6% of a llama-tiny pre-training step. PyTorch's CPU performance guides fix it
by preloading jemalloc or tcmalloc; ptft does the same with glibc's own knobs, set at run time
through mallopt(3): blocks up to 32 MiB (the most the mmap threshold allows) come from the
heap, and the heap is trimmed only when 1 GiB is free at its top. Peak memory is unchanged:
freed blocks are reused, not added to.

Larger blocks (llama-small's 64 MiB chunks of logits, a 32 MiB output projection's gradient)
would still be mapped afresh and faulted in every step: `training_step_allocations(True)` turns
mmap off altogether for the duration of a training step (llama-small's fp32 loss alone
322 -> 259 ms; pretrain-small fp32 step 1.198 -> 1.177 s). Only for the steps, whose
blocks repeat from one step to the next: a block freed in the middle of the heap stays
resident, so one-off large buffers (data preparation, a checkpoint being written) keep mmap
and go back to the kernel when freed.

Left alone when the user has chosen: MALLOC_*_ environment variables, GLIBC_TUNABLES, or an
allocator in LD_PRELOAD. A no-op where the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_MAX_DEFAULT = 65536  # glibc's default count of mmap()ed blocks
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
TRIM_THRESHOLD = 2**30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks instead of returning them to the kernel.
    Returns whether it did."""
    if not sys.platform.startswith("linux"):
        return False
    if any(os.environ.get(name) for name in USER_SETTINGS) or \
            "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _MALLOPT["fn"] = mallopt if kept else None
    return kept


_MALLOPT: dict = {"fn": None}  # glibc's mallopt, once keep_freed_memory has set it up


def training_step_allocations(on: bool) -> None:
    """Within a training step (on=True until on=False): no block is mmap()ed, so the step's
    large blocks come from the kept heap too. A no-op unless keep_freed_memory() applied."""
    mallopt = _MALLOPT["fn"]
    if mallopt is not None:
        mallopt(M_MMAP_MAX, 0 if on else MMAP_MAX_DEFAULT)
