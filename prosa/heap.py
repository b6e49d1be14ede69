"""The C heap under PyTorch's CPU tensors (glibc malloc): giving freed memory back, or keeping it for reuse; and
Python's own collector, paused while a load makes its many small objects.

PyTorch's CPU allocator is plain ``malloc``/``free``. glibc keeps small freed blocks in the process (RSS stays up
after a load's temporaries are gone: ``trim()`` gives them back) and serves large blocks with a fresh ``mmap``
each (every page faulted in again at each allocation: ``keep_freed()`` stops that for a loop that reallocates the
same tensors, such as a training step). ``bound_retention()`` (the engine's setting) keeps a thread's heap from
holding on to a long prompt's temporaries. Elsewhere than glibc all of these do nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import platform
from typing import Iterator

# mallopt parameters (malloc.h) and glibc's defaults for them
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
# bound_retention's thresholds: blocks from 2 MiB mapped apart, a heap's free top over 4 MiB given back on free
_ENGINE_MMAP, _ENGINE_TRIM = 2 << 20, 4 << 20
_bounded = False      # whether bound_retention ran (keep_freed then restores its thresholds, not glibc's)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    try:
        # (not ctypes.util.find_library or platform.libc_ver: they run ldconfig / read the interpreter's binary)
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version, libc.mallopt, libc.malloc_trim      # glibc's own
        return libc
    except (OSError, AttributeError):
        return None


def trim() -> None:
    """Give the heap memory already freed (float copies, temporaries) back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def bound_retention() -> bool:
    """Fixed malloc thresholds for the rest of the process, so that memory a long prompt used comes back.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB) and its trim threshold to
    twice that. From then on a long prompt's temporaries are carved from the engine thread's heap, and that heap's
    free top is kept below 64 MiB: ``malloc_trim`` gives back free chunks of every heap but the top of the main
    heap only. Measured on a 3000-token prompt (tests/test_memory.py): the pool shrank back to 16 blocks and
    24 MB stayed resident; with these fixed thresholds 0-4 MB. Blocks of 2 MiB and more (a long prompt's
    activations, a batch's logits) are then mapped at each allocation: no speed change measured on 512-token
    prefill or 32-sequence decode of the bundled model (2 EPYC cores, within the machine's noise).

    Returns:
        whether the setting applies (False elsewhere than Linux with glibc).
    """
    global _bounded
    libc = _glibc()
    if libc is None:
        return False
    # (setting either threshold also stops glibc's dynamic adjustment of both)
    libc.mallopt(_M_MMAP_THRESHOLD, _ENGINE_MMAP)
    libc.mallopt(_M_TRIM_THRESHOLD, _ENGINE_TRIM)
    _bounded = True
    return True


@contextlib.contextmanager
def keep_freed() -> Iterator[bool]:
    """Keep freed memory in the process, for reuse, while inside; glibc's defaults and a ``trim()`` on exit.

    A training step allocates and frees the same large tensors every step (the logits alone are ~100 MB). glibc
    maps each block over its mmap threshold (32 MB at most) freshly and unmaps it on free, so every step faults
    every page in again: measured ~25,000 page faults and 0.1-0.3 s of system time per step on SmolLM2-135M
    (4 x 256 tokens, 2 EPYC cores), 8% of the step. With mmap off and no automatic trimming the pages are reused.
    The peak resident memory does not grow (the step reaches it anyway); memory is given back later instead.

    On exit the thresholds are glibc's defaults again, or ``bound_retention``'s where that ran.

    Yields:
        whether the setting applies (False elsewhere than Linux with glibc).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    try:
        yield libc is not None
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _ENGINE_TRIM if _bounded else _DEFAULT_TRIM)
            libc.malloc_trim(0)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (as a ``with`` block or a decorator).

    A load makes ~10^5 small objects that hold no cycles (a vocabulary's strings, its merge pairs, the header's
    fields), and every ~700 new ones start a collection that walks the older objects, torch's and the model's among
    them: 0.1-0.15 s of the bundled model's ~0.5 s load (building its 49k merge pairs: 0.09-0.16 s with the
    collector, 0.011 s without). Cycles made meanwhile are collected after. The collector is switched back on only
    if it was on when this block began (a caller's own ``gc.disable()`` stands).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
