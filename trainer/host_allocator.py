"""Keep freed host memory in the process instead of handing it back to the kernel after every step.

A CPU training step allocates and frees the same large tensors every time (activations, gradients, the
buffers of a collective).  glibc's ``malloc`` serves each allocation above its mmap threshold (32 MiB at
most) with a fresh ``mmap`` and unmaps it on free, and gives the top of its heap back past its trim
threshold; every page of such memory is then faulted in, zeroed by the kernel, on its next use.  Threads
other than the main one (gloo's workers, which allocate a collective's flat buffers) get arenas of at most
64 MiB, so their larger buffers are always mmapped.  Measured on 2 gloo ranks at full size
(``bench/step_throughput.py --paired ... --allocator glibc-default``): 50,000–100,000 page faults and
0.15–0.24 s of kernel time per 2.5 s step, against 0–4,500 faults and 0.05–0.11 s with the settings below.

:func:`keep_freed_memory` sets, through ``mallopt``: no mmapped chunks (every allocation comes from the
heap), no trimming of the heap, and one arena for all threads (so the workers' buffers come from the same
heap).  Freed memory is then reused by the next step: 3–10 % less time per step.  The heap keeps what the
largest step needed, so the resident set is higher in the first steps, and level with glibc's defaults once
the sub-networks have reached their largest shapes (``bench/host_allocator.py``: the same peak at step 50).
Only glibc has these knobs; elsewhere (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int; the largest one means "never"


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make this process's ``malloc`` keep and reuse freed memory (module docstring).  Call it early, before the
    process starts its threads (the process group).  Returns whether the settings took (False: not glibc, or
    ``mallopt`` refused one)."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
