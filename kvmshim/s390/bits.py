"""Every s390 pte, PGSTE and storage-key bit the model uses, named as in the kernel.

Values: the 64-bit layout of arch/s390/include/asm/pgtable.h and asm/page.h, read in the 3.15.5
and 3.16.0 trees (research kernel-315-316 §1). Everything is the same in both except two PGSTE
software bits, which the seed commit ("use software dirty bit detection for user dirty
tracking", in 3.16) changed: it added PGSTE_UC_BIT where PGSTE_IN_BIT was and moved IN one bit
down. Those carry their version in the name where the two kernels differ (``PGSTE_IN_BIT_315``);
the plain kernel name is the 3.16 value. Which generation uses which bit is
:mod:`kvmshim.s390.generations`. Later kernels moved UC/IN again (2025: UC 0x8000, IN 0x4000);
the model does not. No other module writes a mask literal: everything imports from here.
"""

from __future__ import annotations

# --- 64-bit page table entry (§1.1) ----------------------------------------------------------
_PAGE_PRESENT = 0x001  # SW: pte present (Linux view)
_PAGE_TYPE = 0x002  # SW: swap/file type bit
_PAGE_YOUNG = 0x004  # SW: referenced
_PAGE_DIRTY = 0x008  # SW: dirty
_PAGE_READ = 0x010  # SW: readable
_PAGE_WRITE = 0x020  # SW: writable (Linux view)
_PAGE_SPECIAL = 0x040  # SW: special mapping
_PAGE_UNUSED = 0x080  # SW: CMMA "unused" state carried in the pte
_PAGE_PROTECT = 0x200  # HW: DAT protection, stores forbidden
_PAGE_INVALID = 0x400  # HW: invalid for translation
_PAGE_LARGE = 0x800  # SW: large pte
_PAGE_SOFT_DIRTY = 0x002  # 4.19: SW soft dirty (CONFIG_MEM_SOFT_DIRTY=y in the s390
#                           defconfigs) where 3.16 has _PAGE_TYPE; pte_mkdirty sets it

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF  # frame address bits of a pte
PTRS_PER_PTE = 256  # entries per page table; one table maps a 1 MiB segment

# Protections (H318): what mk_pte() combines with the frame address.
PAGE_NONE = _PAGE_PRESENT | _PAGE_INVALID
PAGE_READ = _PAGE_PRESENT | _PAGE_READ | _PAGE_INVALID | _PAGE_PROTECT
PAGE_WRITE = _PAGE_PRESENT | _PAGE_READ | _PAGE_WRITE | _PAGE_INVALID | _PAGE_PROTECT
PAGE_SHARED = _PAGE_PRESENT | _PAGE_READ | _PAGE_WRITE | _PAGE_YOUNG | _PAGE_DIRTY

# --- PGSTE, 64-bit: same in 3.15.5 and 3.16.0 unless the comment says otherwise (§1.1) --------
PGSTE_ACC_BITS = 0xF000_0000_0000_0000  # guest key access-control bits (key ACC << 56)
PGSTE_FP_BIT = 0x0800_0000_0000_0000  # guest fetch protection (key F << 56)
PGSTE_PCL_BIT = 0x0080_0000_0000_0000  # PGSTE lock, taken by pgste_get_lock()
PGSTE_HR_BIT = 0x0040_0000_0000_0000  # host referenced (key R << 52)
PGSTE_HC_BIT = 0x0020_0000_0000_0000  # host changed (key C << 52)
PGSTE_GR_BIT = 0x0004_0000_0000_0000  # guest referenced (key R << 48)
PGSTE_GC_BIT = 0x0002_0000_0000_0000  # guest changed (key C << 48)
PGSTE_UC_BIT = 0x0000_8000_0000_0000  # 3.16: user dirty, for migration (new in the seed)
PGSTE_IN_BIT = 0x0000_4000_0000_0000  # 3.16: IPTE notify
PGSTE_IN_BIT_315 = 0x0000_8000_0000_0000  # 3.15.5: IPTE notify, where 3.16 puts UC; no UC

_PGSTE_GPS_ZERO = 0x0000_0000_8000_0000
_PGSTE_GPS_USAGE_MASK = 0x0000_0000_0300_0000
_PGSTE_GPS_USAGE_STABLE = 0x0000_0000_0000_0000
_PGSTE_GPS_USAGE_UNUSED = 0x0000_0000_0100_0000

# --- segment-table entry (pmd), 4.19 asm/pgtable.h and asm/gmap.h ----------------------------
# A guest segment the gmap maps with a 1 MiB page (KVM_CAP_S390_HPAGE_1M, 4.19): its entry in
# the gmap's segment table carries the dirty and notify state the PGSTEs carry for 4 KiB pages.
_SEGMENT_ENTRY_INVALID = 0x20  # HW: invalid segment-table entry
_SEGMENT_ENTRY_PROTECT = 0x200  # HW: segment protection
_SEGMENT_ENTRY_LARGE = 0x400  # HW: STE-format control, a large (1 MiB) page
_SEGMENT_ENTRY_EMPTY = _SEGMENT_ENTRY_INVALID  # what an unlinked gmap entry holds
_SEGMENT_ENTRY_GMAP_UC = 0x4000  # gmap.h: dirty for migration (the segment's PGSTE_UC)
_SEGMENT_ENTRY_GMAP_IN = 0x8000  # gmap.h: invalidation notify (the segment's PGSTE_IN)
HPAGE_SHIFT = 20  # 1 MiB pages
PAGES_PER_SEGMENT = 1 << (HPAGE_SHIFT - 12)  # 256, _PAGE_ENTRIES

# --- storage key byte | ACC(4) | F | R | C | 0 | (asm/page.h, §1.3) -----------------------------
_PAGE_ACC_BITS = 0xF0
_PAGE_FP_BIT = 0x08
_PAGE_REFERENCED = 0x04
_PAGE_CHANGED = 0x02
PAGE_DEFAULT_KEY = 0x00

# Shifts that move storage-key fields into the PGSTE (§1.3): (key & (C|R)) << 48 = GC|GR,
# << 52 = HC|HR, (key & (ACC|F)) << 56 = ACC|FP.
GUEST_RC_SHIFT = 48
HOST_RC_SHIFT = 52
KEY_ACC_SHIFT = 56

# Groups used by tests: each register's single-bit flags and multi-bit fields.
PTE_BITS = {
    "_PAGE_PRESENT": _PAGE_PRESENT,
    "_PAGE_TYPE": _PAGE_TYPE,
    "_PAGE_YOUNG": _PAGE_YOUNG,
    "_PAGE_DIRTY": _PAGE_DIRTY,
    "_PAGE_READ": _PAGE_READ,
    "_PAGE_WRITE": _PAGE_WRITE,
    "_PAGE_SPECIAL": _PAGE_SPECIAL,
    "_PAGE_UNUSED": _PAGE_UNUSED,
    "_PAGE_PROTECT": _PAGE_PROTECT,
    "_PAGE_INVALID": _PAGE_INVALID,
    "_PAGE_LARGE": _PAGE_LARGE,
}
PGSTE_BITS = {
    "PGSTE_ACC_BITS": PGSTE_ACC_BITS,
    "PGSTE_FP_BIT": PGSTE_FP_BIT,
    "PGSTE_PCL_BIT": PGSTE_PCL_BIT,
    "PGSTE_HR_BIT": PGSTE_HR_BIT,
    "PGSTE_HC_BIT": PGSTE_HC_BIT,
    "PGSTE_GR_BIT": PGSTE_GR_BIT,
    "PGSTE_GC_BIT": PGSTE_GC_BIT,
    "PGSTE_UC_BIT": PGSTE_UC_BIT,
    "PGSTE_IN_BIT": PGSTE_IN_BIT,
    "_PGSTE_GPS_ZERO": _PGSTE_GPS_ZERO,
    "_PGSTE_GPS_USAGE_MASK": _PGSTE_GPS_USAGE_MASK,
}
# The 3.15.5 PGSTE: the same register without UC, with IN where UC is in 3.16.
PGSTE_BITS_315 = {
    **{k: v for k, v in PGSTE_BITS.items() if k not in ("PGSTE_UC_BIT", "PGSTE_IN_BIT")},
    "PGSTE_IN_BIT": PGSTE_IN_BIT_315,
}
SEGMENT_BITS = {
    "_SEGMENT_ENTRY_INVALID": _SEGMENT_ENTRY_INVALID,
    "_SEGMENT_ENTRY_PROTECT": _SEGMENT_ENTRY_PROTECT,
    "_SEGMENT_ENTRY_LARGE": _SEGMENT_ENTRY_LARGE,
    "_SEGMENT_ENTRY_GMAP_UC": _SEGMENT_ENTRY_GMAP_UC,
    "_SEGMENT_ENTRY_GMAP_IN": _SEGMENT_ENTRY_GMAP_IN,
}
STORAGE_KEY_BITS = {
    "_PAGE_ACC_BITS": _PAGE_ACC_BITS,
    "_PAGE_FP_BIT": _PAGE_FP_BIT,
    "_PAGE_REFERENCED": _PAGE_REFERENCED,
    "_PAGE_CHANGED": _PAGE_CHANGED,
}
MULTI_BIT_FIELDS = frozenset({"PGSTE_ACC_BITS", "_PGSTE_GPS_USAGE_MASK", "_PAGE_ACC_BITS"})
