"""prosa.heap: freed memory kept for reuse inside ``keep_freed`` (no page faults again), glibc's defaults after."""
import resource

import pytest
import torch

from prosa import heap

pytestmark = pytest.mark.skipif(heap._glibc() is None, reason="glibc's malloc only")


def faults_of_a_64mb_tensor() -> int:
    """Minor page faults of making (and writing) then freeing a 64 MB tensor: ~16k when its pages are new."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)          # every page written
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_keep_freed_reuses_the_pages_of_a_large_freed_tensor_and_restores_glibc_defaults():
    pages = 64 * 2**20 // resource.getpagesize()
    faults_of_a_64mb_tensor()
    assert faults_of_a_64mb_tensor() > pages // 2       # glibc's default: a fresh mmap each time
    with heap.keep_freed() as applied:
        assert applied
        faults_of_a_64mb_tensor()                       # the first one faults its pages in
        assert faults_of_a_64mb_tensor() < pages // 20  # the second reuses them
    assert faults_of_a_64mb_tensor() > pages // 2       # defaults again (and the kept memory trimmed)
