"""Memslot rules and the GET/CLEAR argument checks, with the errno the kernel returns."""

import contextlib
import errno

import numpy as np
import pytest

from kvmshim.abi import KVM_MEM_LOG_DIRTY_PAGES as LOG
from kvmshim.abi import make_slot_id
from kvmshim.errors import KvmError
from kvmshim.memslot import Change, MemslotTable

MiB = 1 << 20


def table_with_slot(npages=1000, flags=LOG):
    t = MemslotTable(max_slots=32)
    t.set_user_memory_region(0, flags, 0x100000, npages * 4096, 0x7F0000000000)
    return t


@contextlib.contextmanager
def raises_errno(err, match=None):
    with pytest.raises(KvmError, match=match) as info:
        yield info
    assert info.value.errno == err, info.value


def test_create_move_flags_delete():
    t = MemslotTable()
    assert t.set_user_memory_region(1, 0, MiB, MiB, 0).kind is Change.CREATE
    assert t.set_user_memory_region(1, 0, 4 * MiB, MiB, 0).kind is Change.MOVE
    assert t.set_user_memory_region(1, LOG, 4 * MiB, MiB, 0).kind is Change.FLAGS_ONLY
    assert t.set_user_memory_region(1, LOG, 4 * MiB, MiB, 0).kind is Change.NONE
    assert t.get(1).log_dirty_pages and t.get(1).guest_phys_addr == 4 * MiB
    assert t.set_user_memory_region(1, LOG, 0, 0, 0).kind is Change.DELETE
    assert t.get(1) is None


def test_prepare_changes_nothing_until_commit():
    t = MemslotTable()
    change = t.prepare(2, 0, 0, MiB, 0)
    assert t.get(2) is None
    t.commit(change)
    assert t.get(2).npages == 256


@pytest.mark.parametrize(
    ("args", "err", "match"),
    [
        ((0, 0x100, 0, MiB, 0), errno.EINVAL, "flags"),
        ((0, 0, 0, 4097, 0), errno.EINVAL, "multiple of 4 KiB"),
        ((0, 0, 123, MiB, 0), errno.EINVAL, "page aligned"),
        ((32, 0, 0, MiB, 0), errno.EINVAL, "below 32"),
        ((make_slot_id(1, 0), 0, 0, MiB, 0), errno.EINVAL, "address space 1"),
        ((0, 0, (1 << 64) - 4096, 8192, 0), errno.EINVAL, "overflows"),
        ((5, 0, 0, 0, 0), errno.EINVAL, "does not exist"),
    ],
)
def test_set_user_memory_region_errors(args, err, match):
    t = MemslotTable(max_slots=32)
    with raises_errno(err, match):
        t.set_user_memory_region(*args)
    assert len(t) == 0


def test_overlap_within_an_address_space_is_eexist():
    t = MemslotTable()
    t.set_user_memory_region(0, 0, 0, 2 * MiB, 0)
    with raises_errno(errno.EEXIST, "overlaps slot 0"):
        t.set_user_memory_region(1, 0, MiB, 2 * MiB, 0)
    t.set_user_memory_region(1, 0, 2 * MiB, MiB, 0)  # adjacent is fine
    with raises_errno(errno.EEXIST):
        t.set_user_memory_region(1, 0, MiB, MiB, 0)  # moving onto slot 0 is not


def test_resize_and_remap_are_einval():
    t = MemslotTable()
    t.set_user_memory_region(0, 0, 0, MiB, 0x1000)
    with raises_errno(errno.EINVAL, "resized"):
        t.set_user_memory_region(0, 0, 0, 2 * MiB, 0x1000)
    with raises_errno(errno.EINVAL, "resized"):
        t.set_user_memory_region(0, 0, 0, MiB, 0x2000)


def test_get_dirty_log_rules():
    t = table_with_slot()
    assert t.for_dirty_log(0).npages == 1000
    with raises_errno(errno.ENOENT, "no such memslot"):
        t.for_dirty_log(3)
    with raises_errno(errno.EINVAL):
        t.for_dirty_log(40)
    with raises_errno(errno.EINVAL):
        t.for_dirty_log(make_slot_id(1, 0))
    t.set_user_memory_region(0, 0, 0x100000, 1000 * 4096, 0x7F0000000000)
    with raises_errno(errno.ENOENT, "dirty logging is not enabled"):
        t.for_dirty_log(0)


@pytest.mark.parametrize(
    ("first", "num", "ok"),
    [
        (0, 1000, True),  # whole slot, ends at the end
        (0, 64, True),
        (960, 40, True),  # 40 is not a multiple of 64 but ends at the slot's end
        (64, 936, True),
        (960, 0, True),  # an empty range is allowed
        (1, 64, False),  # first page unaligned
        (0, 63, False),  # short range not a multiple of 64
        (960, 41, False),  # past the end
        (1024, 0, False),  # first page past the end
    ],
)
def test_clear_dirty_log_range_rules(first, num, ok):
    t = table_with_slot(1000)
    if ok:
        t.for_clear_dirty_log(0, first, num)
    else:
        with raises_errno(errno.EINVAL):
            t.for_clear_dirty_log(0, first, num)


def test_clear_dirty_log_checks_alignment_before_existence():
    # kvm_clear_dirty_log_protect tests first_page & 63 before looking the slot up.
    t = MemslotTable()
    with raises_errno(errno.EINVAL, "multiple of 64"):
        t.for_clear_dirty_log(7, 3, 64)


def test_translate_gfns_vectorised():
    t = MemslotTable()
    t.set_user_memory_region(0, 0, 0, MiB, 0)  # gfn [0, 256)
    t.set_user_memory_region(1, 0, 4 * MiB, MiB, 0)  # gfn [1024, 1280)
    which, page = t.translate_gfns(np.array([0, 255, 256, 1024, 1279, 1280, 5]))
    assert which.tolist() == [0, 0, -1, 1, 1, -1, 0]
    assert page[which >= 0].tolist() == [0, 255, 0, 255, 5]
