"""Process-wide settings for long verification runs."""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Optional

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30,
                      top_pad: int = 64 << 20) -> bool:
    """Let glibc's allocator reuse freed memory instead of handing it back to the kernel.

    Bounding allocates and frees tensors of a few MiB many times a second. By default glibc
    serves each with a fresh ``mmap`` (its dynamic threshold stays low) and returns it on free,
    so every allocation pays page faults and zeroing in the kernel: a third of the CPU time of a
    ReLU-split search on mnist-net_256x4 was system time. Serving blocks up to
    ``mmap_threshold`` bytes (glibc's maximum, 32 MiB) from the heap and keeping up to
    ``trim_threshold`` bytes of free heap fixes that (28 % more subdomains per second measured).
    Returns False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                                (_M_TRIM_THRESHOLD, trim_threshold),
                                                                (_M_TOP_PAD, top_pad)))


def idle_cores() -> int:
    """Cores not busy with other work: the cores this process may run on, less the 1-minute
    load average (rounded), at least 1.

    torch's OpenMP threads spin while they wait for each other, so a thread more than there are
    free cores stalls every small operation: measured with one other busy process on the 2
    cores, ACAS Xu 1_1 prop_1 took 2.0 s with 1 thread and timed out at 30 s with 2."""
    import os
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, cores - busy)


def available_memory(device) -> Optional[int]:
    """Bytes that new tensors on ``device`` can still take: the GPU's free memory, or on the CPU
    the kernel's MemAvailable (/proc/meminfo). None where it cannot be known."""
    import torch
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_OUT_OF_MEMORY_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed for want of memory: CUDA's
    ``OutOfMemoryError``, Python's ``MemoryError``, or the ``RuntimeError`` of torch's CPU
    allocator ("DefaultCPUAllocator: not enough memory" / "can't allocate memory")."""
    import torch
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OUT_OF_MEMORY_MESSAGES)
