"""Bit layouts: values from Linux 3.15.5 and 3.16.0, single bits where they should be, no
overlaps."""

import itertools

import pytest

from kvmshim.s390 import bits as b

GROUPS = {
    "pte": b.PTE_BITS,
    "pgste": b.PGSTE_BITS,
    "pgste 3.15": b.PGSTE_BITS_315,
    "pte 4.19": b.PTE_BITS_419,
    "pgste 4.19": b.PGSTE_BITS_419,
    "gmap segment entry": b.GMAP_SEGMENT_BITS,
    "host segment entry": b.HOST_SEGMENT_BITS,
    "storage key": b.STORAGE_KEY_BITS,
}


@pytest.mark.parametrize("group", GROUPS)
def test_flags_are_single_bits_and_fields_are_not(group):
    for name, value in GROUPS[group].items():
        single = value != 0 and value & (value - 1) == 0
        assert single == (name not in b.MULTI_BIT_FIELDS), name


@pytest.mark.parametrize("group", GROUPS)
def test_bits_of_one_register_do_not_overlap(group):
    for (n1, v1), (n2, v2) in itertools.combinations(GROUPS[group].items(), 2):
        assert v1 & v2 == 0, (n1, n2)


def test_seed_commit_values():
    # The seed added UC where IN used to be and moved IN one bit down (3.15.5 / 3.16.0
    # asm/pgtable.h, 64-bit branch).
    assert b.PGSTE_UC_BIT == 0x0000800000000000
    assert b.PGSTE_IN_BIT == 0x0000400000000000
    assert b.PGSTE_IN_BIT_315 == 0x0000800000000000 == b.PGSTE_UC_BIT
    assert "PGSTE_UC_BIT" not in b.PGSTE_BITS_315


def test_storage_key_fields_shift_into_the_pgste():
    rc = b._PAGE_CHANGED | b._PAGE_REFERENCED
    assert rc << b.GUEST_RC_SHIFT == b.PGSTE_GC_BIT | b.PGSTE_GR_BIT
    assert rc << b.HOST_RC_SHIFT == b.PGSTE_HC_BIT | b.PGSTE_HR_BIT
    assert (b._PAGE_ACC_BITS | b._PAGE_FP_BIT) << b.KEY_ACC_SHIFT == (
        b.PGSTE_ACC_BITS | b.PGSTE_FP_BIT
    )


def test_protections_encode_the_hardware_invariant():
    # HW INVALID unless YOUNG and READ; HW PROTECT unless DIRTY and WRITE.
    assert b.PAGE_READ & b._PAGE_INVALID and b.PAGE_READ & b._PAGE_PROTECT
    assert not b.PAGE_SHARED & (b._PAGE_INVALID | b._PAGE_PROTECT)


def test_4_19_values():
    # 4.19.1 asm/pgtable.h, asm/gmap.h, asm/page.h (research kernel-419 §1).
    assert b._PAGE_SOFT_DIRTY == b._PAGE_TYPE == 0x002 and b._PAGE_NOEXEC == 0x100
    assert b.PGSTE_VSIE_BIT == 0x0000200000000000 and b._PGSTE_GPS_NODAT == 0x40000000
    assert (b._SEGMENT_ENTRY_GMAP_IN, b._SEGMENT_ENTRY_GMAP_UC) == (0x8000, 0x4000)
    # GMAP_UC shares its value with the host pmd's soft-dirty bit, which __gmap_link masks out.
    assert b._SEGMENT_ENTRY_SOFT_DIRTY == b._SEGMENT_ENTRY_GMAP_UC
    assert not b._SEGMENT_ENTRY_HARDWARE_BITS_LARGE & b._SEGMENT_ENTRY_SOFT_DIRTY
    assert b._SEGMENT_ENTRY_HARDWARE_BITS_LARGE & 0xFFFFF == (
        b._SEGMENT_ENTRY_LARGE
        | b._SEGMENT_ENTRY_PROTECT
        | b._SEGMENT_ENTRY_NOEXEC
        | b._SEGMENT_ENTRY_INVALID
        | 0x10
    )
    assert b.HPAGE_SIZE == 1 << 20 == b.PAGES_PER_SEGMENT * 4096
    assert b.PAGE_RO == b.PAGE_READ | b._PAGE_NOEXEC and b.PAGE_RW == b.PAGE_RO | b._PAGE_WRITE
