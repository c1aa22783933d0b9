"""Keep freed memory in the process, so that training does not page-fault on every step.

A training step allocates and frees tensors of hundreds of MB (the full softmax's (positions x
items) logits and their gradient: 128 users x 200 positions x 3,417 ML-1M items is 350 MB in
float32). glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MB on 64-bit)
with a fresh ``mmap`` and gives it back with ``munmap`` on free, so on every step the kernel maps
and zeroes the same memory again, one 4 KB page fault at a time. Measured on a 2-core CPU with the
default ML-1M model and batch, one thread (``benchmarks/allocator.py``): ~440,000 page faults
and more kernel time than computation per step.

:func:`keep_freed_memory` turns that off for the whole process through ``mallopt`` (glibc only):
no ``mmap`` for the heap's allocations (``M_MMAP_MAX = 0``), the heap's free top kept up to 2 GB
(``M_TRIM_THRESHOLD``) and grown 1 GB at a time (``M_TOP_PAD``: address space, not memory, until
touched). Freed blocks are then reused without a fault. The price: memory the process has freed
stays with it until it exits (its resident size stays near its peak instead of falling between
steps or rounds), and fragmentation can add to the peak. Threads other than the main one allocate
from their own arenas, which still fall back to ``mmap`` for blocks larger than an arena heap.

Kept memory fragments: blocks of many sizes (batches of different history lengths, evaluation)
leave free holes that stay resident (ML-1M's default centralized run peaked at 10.2 GB RSS against
5.7 GB with glibc's defaults). :func:`release_freed_memory` (``malloc_trim``) hands the free pages
back to the kernel. Federated local training (plain and DP-SGD) calls it when a round's training
ends, since a client then idles until the next round. Centralized training does not: calling it
after every epoch lowered that run's peak to 9.2 GB only and cost 13 % of the epoch time.

Set the environment variable ``FEDREC_MALLOC=system`` to keep glibc's defaults; ``reuse`` (or
unset) applies the settings above. Training calls this before its first step
(``core_model.train.train_epoch``, ``privacy.dp.dp_local_train``); calling it again is harmless.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

ENV = "FEDREC_MALLOC"
CHOICES = ("reuse", "system")

# mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GB is the most it accepts
TOP_PAD = 2**30


def malloc_mode() -> str:
    """The value of ``FEDREC_MALLOC`` (default ``reuse``), validated."""
    mode = os.environ.get(ENV, "reuse").strip() or "reuse"
    if mode not in CHOICES:
        raise ValueError(f"environment variable {ENV} must be one of {CHOICES}, got {mode!r}")
    return mode


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and ``FEDREC_MALLOC`` is not ``system``; otherwise None."""
    if malloc_mode() == "system" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc without the usual soname
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory (see the module docstring).

    Returns True when the settings were applied, False when ``FEDREC_MALLOC=system`` or the C
    library is not glibc (macOS, musl, Windows: nothing is changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    applied = all(libc.mallopt(param, value) == 1 for param, value in
                  ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not applied:  # pragma: no cover - mallopt refuses only out-of-range values
        log.warning("mallopt refused a setting; training runs with glibc's default allocator behaviour")
    return applied


def release_freed_memory() -> bool:
    """Give the free pages of the process' heaps back to the kernel (glibc ``malloc_trim(0)``).

    Returns True when memory was released; False when nothing was (``FEDREC_MALLOC=system``, where
    glibc trims by itself, a C library other than glibc, or no free page to release).
    """
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1
