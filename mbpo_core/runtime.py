"""Process-level settings that make CPU training fast; applied by entry points, never on import."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def tune_allocator(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed tensor memory in the heap instead of unmapping it.

    glibc serves allocations above 128 KiB-32 MiB with mmap and unmaps them on free, so every
    activation tensor of a SAC update (0.5-1 MB) costs fresh page faults. Raising the mmap and
    trim thresholds lets malloc reuse that memory. Set MBPO_NO_MALLOC_TUNING=1 to skip."""
    if os.environ.get("MBPO_NO_MALLOC_TUNING"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_TOP_PAD, 64 << 20))
    log.debug("malloc tuning %s", "applied" if ok else "refused")
    return ok
