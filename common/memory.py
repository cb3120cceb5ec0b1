"""What a training process holds in memory, and the allocator setting that lets it give memory back.

glibc's malloc keeps freed heap blocks resident and raises its mmap threshold each time a large
block is freed (up to 32 MiB), so after the first step a process serves a step's activations from
the heap and keeps the high-water mark of every step before it: a low-bit step that allocates
less than an fp32 one then peaks no lower (measured: ResNet-18, 4-bit 1.14-1.33x fp32 in a
default process; 0.59x with the threshold fixed). ``return_freed_memory`` fixes the threshold
from inside the process (``mallopt``), as ``MALLOC_MMAP_THRESHOLD_`` would from outside, so every
block over 64 KiB is its own mapping, unmapped on free. The price is a page fault for every page
a step touches afresh: about twice the step time on the project's machine (docs/BENCHMARKS.md,
"Memory a device really needs"), which is why ``configure_allocator`` makes it a choice. Free of
torch and Flower; Linux-only readings return None elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

MMAP_THRESHOLD_BYTES = 64 * 1024  # blocks above it are mapped on their own, unmapped on free
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_STATUS = Path("/proc/self/status")
_lean = False  # whether this process gives freed memory back (set once, never undone)
_CLEAR_REFS = Path("/proc/self/clear_refs")


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes for this process, so freed
    tensors go back to the system instead of staying resident; True where it took effect
    (glibc), False elsewhere (another libc, another OS): then nothing changes."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold)
    )


def configure_allocator(mode: str, in_simulation: bool) -> str:
    """Set this process's allocator for a client, by the run config's ``allocator``: ``lean``
    gives freed memory back (``return_freed_memory``), ``fast`` keeps glibc's default, ``auto``
    is lean on a deployed device and fast in a simulation (its actors are not devices, and
    their time is the experiment's). Returns what the process now does: ``lean`` or ``fast``
    (``lean`` asked where glibc is absent stays ``fast``). A process made lean stays lean."""
    global _lean
    if mode not in ("auto", "lean", "fast"):
        raise ValueError(f"allocator {mode!r} is not one of auto, lean, fast")
    wanted = mode == "lean" or (mode == "auto" and not in_simulation)
    if wanted and not _lean:
        _lean = return_freed_memory()
    return "lean" if _lean else "fast"


def allocator_mode() -> str:
    """What this process's allocator does with freed memory: ``lean`` or ``fast``."""
    return "lean" if _lean else "fast"


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_mb() -> float | None:
    """This process's resident memory now, in MiB (None where /proc is not Linux's)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_resident_mb() -> float | None:
    """This process's peak resident memory since it started or since ``reset_peak``, in MiB."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak() -> bool:
    """Start a new peak-memory window (``VmHWM`` back to the current resident size); False
    where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
