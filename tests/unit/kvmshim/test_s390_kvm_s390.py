"""The s390 arch rules as pure functions over memslots: the 1 MiB rule and what the inclusive
harvest bound of kvm_s390_sync_dirty_log (3.16.0) reaches."""

import errno

import pytest

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.errors import KvmError
from kvmshim.memslot import Memslot
from kvmshim.s390.kvm_s390 import (
    host_page_after,
    kvm_arch_prepare_memory_region,
    sync_dirty_log_overreach,
)

MiB = 1 << 20


def slot(id, gpa, size, uaddr, flags=LOG):
    return Memslot(0, id, gpa, size, flags, uaddr)


@pytest.mark.parametrize(
    ("uaddr", "size", "what"),
    [(4096, MiB, "1 MiB boundary"), (0, MiB - 4096, "1 MiB multiples"), (MiB, 0x1000, "1 MiB")],
)
def test_prepare_memory_region_wants_1_mib_host_address_and_size(uaddr, size, what):
    with pytest.raises(KvmError, match=what) as info:
        kvm_arch_prepare_memory_region(3, uaddr, size)
    assert info.value.errno == errno.EINVAL and info.value.slot == 3


def test_prepare_memory_region_accepts_segments_and_deletion():
    kvm_arch_prepare_memory_region(0, 3 * MiB, 2 * MiB)
    kvm_arch_prepare_memory_region(0, 3 * MiB, 0)  # delete: memory_size 0


def test_host_page_after_finds_every_slot_that_backs_it():
    a = slot(0, 0, MiB, 0)
    b = slot(1, 16 * MiB, 2 * MiB, MiB)
    alias = slot(2, 32 * MiB, MiB, MiB - MiB)  # shares A's host range: not past A's end
    assert host_page_after([a, b, alias], a) == [(b, 0)]
    inside = slot(3, 64 * MiB, 2 * MiB, 0)  # A's end is this slot's page 256
    assert host_page_after([a, inside], a) == [(inside, 256)]


@pytest.mark.parametrize(
    ("b", "expected"),
    [
        (slot(1, MiB, MiB, MiB), []),  # adjacent in guest and host: reported to B by the kernel
        (slot(1, 16 * MiB, MiB, MiB), [(1, 0)]),  # apart in guest memory: lost
        (slot(1, MiB, MiB, MiB, flags=0), [(1, 0)]),  # B not logging: the mark goes nowhere
        (slot(1, MiB, MiB, 8 * MiB), []),  # apart in host memory: nothing reached
    ],
)
def test_overreach_names_what_the_kernel_would_not_report_to_its_own_slot(b, expected):
    a = slot(0, 0, MiB, 0)
    assert sync_dirty_log_overreach([a, b], a) == expected
    assert sync_dirty_log_overreach([a, b], b) == []
