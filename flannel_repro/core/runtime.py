"""Process settings that make training faster and change no number, applied once when a process starts.

`cli.main` calls `configure()` before it runs any command (so `flannel-repro train`, `verify` and the DVC stages get
them without any environment variable), and the benchmarks call it in the processes that stand for flannel-repro.

The setting is glibc's: keep large blocks in the heap. Every training step allocates and frees several
(batch * seq, vocab) buffers (164 MB each in float32 at the defaults: the float logits, their log-softmax and the
gradients of both). By default glibc serves blocks over 32 MB with mmap and gives them back with munmap when freed,
so the kernel maps (and zeroes) fresh pages for them at the next step: about 200,000 page faults a step, 40% of the
process's CPU time in the kernel on a 2-core machine. With mmap off for malloc and a trim threshold above the
step's transient, the freed blocks stay in the heap and the next step reuses them. Where a buffer lives changes no
bit of what is computed. README "Benchmarks" has the measurements and the alternatives that were tried.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# Free memory at the top of the heap is given back to the kernel only above this much (the largest value mallopt
# takes, 2 GiB): more than a step's transient (about 0.6 GB at the defaults), so its blocks stay mapped from one
# step to the next. A training process's memory stays at its peak until it exits.
TRIM_THRESHOLD = 2**31 - 1


@dataclass(frozen=True)
class Runtime:
    allocator: str  # what this process's large blocks use, for benchmark reports
    note: str | None  # one line when the fast setting is not available here; None when it is applied


def configure() -> Runtime:
    """Keep large freed blocks in glibc's heap for the rest of this process. Never fails: where the C library is
    not glibc (macOS, musl) the process keeps the system's allocator, which is slower and gives the same numbers."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; None or an error elsewhere
    except (AttributeError, ValueError, OSError):
        libc_version = None
    if not (libc_version or "").startswith("glibc"):
        return _unavailable("the C library here is not glibc")
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _unavailable("glibc's mallopt could not be loaded")
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. Turning mmap off first means no later block is mapped outside the heap.
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return _unavailable("glibc refused the mallopt settings")
    return Runtime("glibc, large blocks kept in the heap", None)


def _unavailable(why: str) -> Runtime:
    return Runtime(
        "system default",
        f"{why}, so large freed buffers go back to the system at every step (slower; the numbers are the same)",
    )
