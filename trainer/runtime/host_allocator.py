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
heap) and no trimming of the heap; :func:`share_one_arena`, called by the entry point before any other thread
exists, gives all threads the main arena (so the workers' buffers come from the same heap).  Freed memory is
then reused by the next step: 3–10 % less time per step for ZeRO-0/1/2 and the plain loop, 14 % for ZeRO-3.
The heap keeps what the largest step needed (and, for a large block allocated again and again, a few freed
copies: glibc's aligned request is a little larger than the block freed before it, so it reuses one only once
enough free space has gathered; ``tests/trainer/test_host_allocator.py``), so the resident set is higher in the first
steps; once the sub-networks have reached their largest shapes it is level with glibc's defaults or a few
percent above (``bench/host_allocator.py``: ZeRO-1 the same peak at step 50, ZeRO-3 5 % more at step 20, its
heap still growing).
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
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

one_arena = False
"""Whether :func:`share_one_arena` took in this process."""


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def arena_count() -> int:
    """How many malloc arenas this process has (``malloc_info``); 0 where that cannot be told (not glibc)."""
    libc = _glibc()
    if libc is None:
        return 0
    buffer, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    stream = libc.open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return 0
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    report = ctypes.string_at(buffer, size.value).decode(errors="replace")
    libc.free(buffer)
    return report.count("<heap nr=")


def share_one_arena() -> bool:
    """Give every thread of this process the main malloc arena.  glibc fixes its arena limit when a thread other
    than the main one first allocates, so this takes only before that: entry points call it before importing
    numpy or torch (numpy's OpenBLAS starts a thread at import).  Returns whether it took (only the main arena
    exists and ``mallopt`` accepted the limit)."""
    global one_arena
    libc = _glibc()
    took = libc is not None and arena_count() == 1 and libc.mallopt(ctypes.c_int(M_ARENA_MAX), ctypes.c_int(1)) == 1
    one_arena = one_arena or took
    return took


def keep_freed_memory() -> bool:
    """Make this process's ``malloc`` keep and reuse freed memory (module docstring): no mmapped chunks, no trimming;
    threads share the main arena if :func:`share_one_arena` took.  Returns whether the settings took (False: not
    glibc, or ``mallopt`` refused one)."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1 for param, value in settings)
