"""Process-wide allocator setting for the command line's short-lived processes.

A sync of a million messages allocates and frees hundreds of numpy arrays of several
megabytes. glibc hands each such block back to the kernel when it is freed (``munmap``,
or a heap trim), so the next array of that size faults every page in again: at 1M
messages that was 181,000 minor faults, about a second of system time. The command line
asks glibc to keep freed memory for reuse instead; a program that imports the library is
left alone (its allocator is its own business)."""

from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameters (``<malloc.h>``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap (freed ones are reused, not unmapped)
MMAP_THRESHOLD = 1 << 30
#: free memory at the top of the heap is given back only beyond this much
TRIM_THRESHOLD = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to reuse freed blocks rather than return them to the
    kernel (``mallopt``); whether it agreed (``False`` on other C libraries)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
