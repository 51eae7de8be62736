"""Every s390 pte, PGSTE and storage-key bit the model uses, named as in the kernel.

Values: the 64-bit layout of arch/s390/include/asm/pgtable.h and asm/page.h, read in the 3.15.5
and 3.16.0 trees (research kernel-315-316 §1). Everything is the same in both except two PGSTE
software bits, which the seed commit ("use software dirty bit detection for user dirty
tracking", in 3.16) changed: it added PGSTE_UC_BIT where PGSTE_IN_BIT was and moved IN one bit
down. Those carry their version in the name where the two kernels differ (``PGSTE_IN_BIT_315``);
the plain kernel name is the 3.16 value. Which generation uses which bit is
:mod:`kvmshim.s390.generations`. Later kernels moved UC/IN again (2025: UC 0x8000, IN 0x4000);
the model does not. No other module writes a mask literal: everything imports from here.

4.19 (research kernel-419 §1, read in 4.19.1) keeps every value above; the names it adds (the
segment-table entry of the host pmd and of the gmap, _PAGE_SOFT_DIRTY and _PAGE_NOEXEC,
PGSTE_VSIE_BIT, _PGSTE_GPS_NODAT, HPAGE_*) say 4.19 beside them, and the groups that differ from
3.16 carry the suffix (``PTE_BITS_419``).
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
# 4.19 (research kernel-419 §1.2): 0x002 is _PAGE_SOFT_DIRTY (CONFIG_MEM_SOFT_DIRTY=y in the s390
# defconfigs; pte_mkdirty sets it) and 0x100, _PAGE_CO until 3.17, is the HW no-execute bit.
_PAGE_SOFT_DIRTY = 0x002  # 4.19 SW: soft dirty (the bit 3.16 calls _PAGE_TYPE)
_PAGE_NOEXEC = 0x100  # 4.19 HW: no-execute (stripped again on machines without NX)

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF  # frame address bits of a pte
PTRS_PER_PTE = 256  # entries per page table; one table maps a 1 MiB segment

# Protections (H318): what mk_pte() combines with the frame address.
PAGE_NONE = _PAGE_PRESENT | _PAGE_INVALID
PAGE_READ = _PAGE_PRESENT | _PAGE_READ | _PAGE_INVALID | _PAGE_PROTECT
PAGE_WRITE = _PAGE_PRESENT | _PAGE_READ | _PAGE_WRITE | _PAGE_INVALID | _PAGE_PROTECT
PAGE_SHARED = _PAGE_PRESENT | _PAGE_READ | _PAGE_WRITE | _PAGE_YOUNG | _PAGE_DIRTY
# 4.19 names (§1.2): a PROT_READ|PROT_WRITE mapping without PROT_EXEC gets PAGE_RW when shared
# (hugetlbfs: no write notification) and PAGE_RO (__P011) when it wants write notification.
PAGE_RO = _PAGE_PRESENT | _PAGE_READ | _PAGE_NOEXEC | _PAGE_INVALID | _PAGE_PROTECT
PAGE_RW = PAGE_RO | _PAGE_WRITE

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

PGSTE_VSIE_BIT = 0x0000_2000_0000_0000  # 4.19: referenced in a vSIE shadow table

_PGSTE_GPS_ZERO = 0x0000_0000_8000_0000
_PGSTE_GPS_NODAT = 0x0000_0000_4000_0000  # 4.19: ESSA "stable, no DAT" (IPTE_NODAT)
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
_SEGMENT_ENTRY_NOEXEC = 0x100  # HW: segment no-execute
_SEGMENT_ENTRY = 0x0  # a valid entry pointing at a page table (its origin is not modelled)
_SEGMENT_ENTRY_ORIGIN_LARGE = ~0xF_FFFF & 0xFFFF_FFFF_FFFF_FFFF  # large page frame address
# What __gmap_link copies from the host pmd into the gmap entry: origin and the HW bits.
_SEGMENT_ENTRY_HARDWARE_BITS = 0xFFFF_FFFF_FFFF_FE30
_SEGMENT_ENTRY_HARDWARE_BITS_LARGE = 0xFFFF_FFFF_FFF0_0730
# Software bits of the host's large pmd (hugetlbfs); they never reach the gmap entry.
_SEGMENT_ENTRY_READ = 0x0001
_SEGMENT_ENTRY_WRITE = 0x0002
_SEGMENT_ENTRY_YOUNG = 0x1000
_SEGMENT_ENTRY_DIRTY = 0x2000
_SEGMENT_ENTRY_SOFT_DIRTY = 0x4000  # host pmd only: the value GMAP_UC has in the gmap entry
GMAP_NOTIFY_MPROT = 0x1  # gmap.h: gmap_protect_* arms _SEGMENT_ENTRY_GMAP_IN / PGSTE_IN_BIT
GMAP_NOTIFY_SHADOW = 0x2  # gmap.h: ... PGSTE_VSIE_BIT (vSIE; needs split pmds)
HPAGE_SHIFT = 20  # 1 MiB pages
HPAGE_SIZE = 1 << HPAGE_SHIFT
HPAGE_MASK = ~(HPAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
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
# The gmap's segment entry: hardware bits plus gmap.h's status bits.
GMAP_SEGMENT_BITS = {**SEGMENT_BITS, "_SEGMENT_ENTRY_NOEXEC": _SEGMENT_ENTRY_NOEXEC}
# The host's large pmd (hugetlbfs): hardware bits plus the software ones.
HOST_SEGMENT_BITS = {
    **{k: v for k, v in GMAP_SEGMENT_BITS.items() if "GMAP" not in k},
    "_SEGMENT_ENTRY_READ": _SEGMENT_ENTRY_READ,
    "_SEGMENT_ENTRY_WRITE": _SEGMENT_ENTRY_WRITE,
    "_SEGMENT_ENTRY_YOUNG": _SEGMENT_ENTRY_YOUNG,
    "_SEGMENT_ENTRY_DIRTY": _SEGMENT_ENTRY_DIRTY,
    "_SEGMENT_ENTRY_SOFT_DIRTY": _SEGMENT_ENTRY_SOFT_DIRTY,
}
# The 4.19 pte and PGSTE: soft dirty where 3.16 has _PAGE_TYPE, NX, and the vSIE/NODAT bits.
PTE_BITS_419 = {
    **{k: v for k, v in PTE_BITS.items() if k != "_PAGE_TYPE"},
    "_PAGE_SOFT_DIRTY": _PAGE_SOFT_DIRTY,
    "_PAGE_NOEXEC": _PAGE_NOEXEC,
}
PGSTE_BITS_419 = {
    **PGSTE_BITS,
    "PGSTE_VSIE_BIT": PGSTE_VSIE_BIT,
    "_PGSTE_GPS_NODAT": _PGSTE_GPS_NODAT,
}
STORAGE_KEY_BITS = {
    "_PAGE_ACC_BITS": _PAGE_ACC_BITS,
    "_PAGE_FP_BIT": _PAGE_FP_BIT,
    "_PAGE_REFERENCED": _PAGE_REFERENCED,
    "_PAGE_CHANGED": _PAGE_CHANGED,
}
MULTI_BIT_FIELDS = frozenset({"PGSTE_ACC_BITS", "_PGSTE_GPS_USAGE_MASK", "_PAGE_ACC_BITS"})
