"""Kernel generations of the s390 model: every difference between them, in one place.

A generation is the set of arch/s390 dirty-tracking primitives of one kernel, driven by the one
harvest loop s390 has (3.16's ``kvm_s390_sync_dirty_log``). The vectorised engine
(:mod:`kvmshim.s390.mmu`) reads these fields and nothing else to tell generations apart; the
per-page oracle (:mod:`kvmshim.s390.reference`) has instead one module of literal functions per
kernel, so the engine's switches are checked against code that has none.

* **"3.16"** — the seed tree exactly (3.16.0, research kernel-315-316 §1-§4).
* **"3.15"** — the code the seed removed (3.15.5): hardware change-bit tracking through
  PGSTE_HC. 3.15's own KVM_GET_DIRTY_LOG on s390 was a stub that returned 0 without harvesting
  (§4.1; ``kvm_s390_sync_dirty_log`` is new in 3.16), so this generation is 3.15.5's pgtable
  primitives driven by 3.16's harvest loop: what the kernel would do with the seed reverted.

Assumed in both: the mm uses storage keys (``mm_use_skey``, 3.16; always so in 3.15), i.e. the
guest's first key instruction has been intercepted before anything the model shows (§7.6).
Not in either: what 3.17 added (``pgste_set_key`` in ``ptep_set_access_flags``,
``pgste_update_all`` in ``ptep_test_and_clear_young``, the fault-and-retry in
``set_guest_storage_key``) and the later ``_PAGE_UNUSED`` clearing in ``set_pte_at`` (§7.1-§7.5).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmshim.errors import KvmShimError
from kvmshim.s390 import bits as b

KERNELS: tuple[str, ...] = ("3.15", "3.16", "4.19")
DEFAULT_KERNEL = "3.16"


@dataclass(frozen=True)
class KernelGeneration:
    """The bits and behaviour switches of one generation; each cites version and function."""

    name: str
    source: str  # the tree the primitives were read in
    # --- bit values (asm/pgtable.h) ---------------------------------------------------------
    pgste_in_bit: int  # PGSTE_IN_BIT
    user_dirty_bit: int  # what pgste_set_pte sets for a hardware-writable valid pte (0: none)
    harvest_bit: int  # what ptep_test_and_clear_user_dirty tests and clears
    key_change_bit: int  # what set_guest_storage_key sets when the guest key changes
    pgste_initial: int  # every PGSTE of a new table (page_table_alloc_pgste, mm/pgtable.c)
    # --- behaviour --------------------------------------------------------------------------
    update_all_moves_host_rc: bool  # pgste_update_all: real C/R into HC/HR, reset in the key
    set_key_copies_guest_rc: bool  # pgste_set_key: GR/GC into the real key (else R = C = 0)
    force_dirty_on_invalid: bool  # pgste_set_pte (no ESOP): force DIRTY on invalid ptes too
    harvest_folds_key: bool  # ptep_test_and_clear_user_dirty: pgste_update_all first
    harvest_protects: bool  # ptep_test_and_clear_user_dirty: IPTE, then PROTECT/INVALID
    sync_dirty_log_inclusive: bool  # kvm_s390_sync_dirty_log: cur_gfn <= last_gfn
    memslot_segment_rule: bool  # kvm_arch_prepare_memory_region: uaddr, size 1 MiB aligned
    # --- since 3.17 (all False before) --------------------------------------------------------
    xchg_commit_keys: bool = False  # ptep_xchg_commit: set the key when the old pte was
    #   invalid, fold it (pgste_update_all) when the new one is; ptep_set_access_flags and
    #   ptep_test_and_clear_young both exchange through it
    notify_arm_sets_pte: bool = False  # ptep_force_prot: pgste_set_pte after arming IN
    sync_dirty_log_by_segment: bool = False  # kvm_s390_sync_dirty_log: gmap_sync_dirty_log_pmd
    #   per 1 MiB guest segment; the inclusive bound reaches the guest segment after the slot
    hugepages: bool = False  # KVM_CAP_S390_HPAGE_1M: guest memory on 1 MiB pages
    pte_soft_dirty: int = 0  # what pte_mkdirty sets beside _PAGE_DIRTY (_PAGE_SOFT_DIRTY)
    memslot_gpa_segment_rule: bool = False  # the model refuses a guest address off 1 MiB
    #   (kvm_arch_commit_memory_region's gmap_map_segment cannot map it; see kvm_s390.py)


GENERATIONS: dict[str, KernelGeneration] = {
    "3.15": KernelGeneration(
        name="3.15",
        source="Linux 3.15.5 pgtable primitives (same as 3.14.1), 3.16.0 harvest loop",
        pgste_in_bit=b.PGSTE_IN_BIT_315,  # 3.15.5 asm/pgtable.h
        user_dirty_bit=0,  # 3.15.5 pgste_set_pte: no UC exists
        harvest_bit=b.PGSTE_HC_BIT,  # 3.15.5 ptep_test_and_clear_user_dirty
        key_change_bit=b.PGSTE_HC_BIT,  # 3.15.5 set_guest_storage_key
        pgste_initial=b.PGSTE_HR_BIT | b.PGSTE_HC_BIT,  # 3.15.5 page_table_alloc_pgste
        update_all_moves_host_rc=True,  # 3.15.5 pgste_update_all
        set_key_copies_guest_rc=False,  # 3.15.5 pgste_set_key: "set real key C/R to 0"
        force_dirty_on_invalid=True,  # 3.15.5 pgste_set_pte: no _PAGE_INVALID test
        harvest_folds_key=True,  # 3.15.5 ptep_test_and_clear_user_dirty
        harvest_protects=False,  # 3.15.5 ptep_test_and_clear_user_dirty: pte untouched
        sync_dirty_log_inclusive=True,  # 3.16.0 kvm_s390_sync_dirty_log (3.15 had none)
        memslot_segment_rule=True,  # 3.15.5 kvm_arch_prepare_memory_region
    ),
    "3.16": KernelGeneration(
        name="3.16",
        source="Linux 3.16.0 (the seed tree)",
        pgste_in_bit=b.PGSTE_IN_BIT,  # 3.16.0 asm/pgtable.h (the seed moved it)
        user_dirty_bit=b.PGSTE_UC_BIT,  # 3.16.0 pgste_set_pte (the seed)
        harvest_bit=b.PGSTE_UC_BIT,  # 3.16.0 ptep_test_and_clear_user_dirty (the seed)
        key_change_bit=b.PGSTE_UC_BIT,  # 3.16.0 set_guest_storage_key (the seed)
        pgste_initial=0,  # 3.16.0 page_table_alloc_pgste (the seed)
        update_all_moves_host_rc=False,  # 3.16.0 pgste_update_all (the seed)
        set_key_copies_guest_rc=True,  # 3.16.0 pgste_set_key (the seed)
        force_dirty_on_invalid=False,  # 3.16.0 pgste_set_pte (the seed)
        harvest_folds_key=False,  # 3.16.0 ptep_test_and_clear_user_dirty (the seed)
        harvest_protects=True,  # 3.16.0 ptep_test_and_clear_user_dirty (the seed)
        sync_dirty_log_inclusive=True,  # 3.16.0 kvm_s390_sync_dirty_log
        memslot_segment_rule=True,  # 3.16.0 kvm_arch_prepare_memory_region
    ),
    "4.19": KernelGeneration(
        name="4.19",
        source="Linux 4.19 (research kernel-419)",
        pgste_in_bit=b.PGSTE_IN_BIT,  # 4.19 asm/pgtable.h: unchanged since 3.16
        user_dirty_bit=b.PGSTE_UC_BIT,  # 4.19 mm/pgtable.c pgste_set_pte
        harvest_bit=b.PGSTE_UC_BIT,  # 4.19 mm/pgtable.c ptep_test_and_clear_uc
        key_change_bit=b.PGSTE_UC_BIT,  # 4.19 mm/pgtable.c set_guest_storage_key
        pgste_initial=0,  # 4.19 mm/pgalloc.c page_table_alloc_pgste
        update_all_moves_host_rc=False,  # 4.19 mm/pgtable.c pgste_update_all
        set_key_copies_guest_rc=True,  # 4.19 mm/pgtable.c pgste_set_key
        force_dirty_on_invalid=False,  # 4.19 mm/pgtable.c pgste_set_pte
        harvest_folds_key=False,  # 4.19 mm/pgtable.c ptep_test_and_clear_uc
        harvest_protects=True,  # 4.19 mm/pgtable.c ptep_test_and_clear_uc
        sync_dirty_log_inclusive=True,  # 4.19 kvm/kvm-s390.c kvm_s390_sync_dirty_log
        memslot_segment_rule=True,  # 4.19 kvm/kvm-s390.c kvm_arch_prepare_memory_region
        xchg_commit_keys=True,  # 4.19 mm/pgtable.c ptep_xchg_commit
        notify_arm_sets_pte=True,  # 4.19 mm/pgtable.c ptep_force_prot
        sync_dirty_log_by_segment=True,  # 4.19 kvm/kvm-s390.c, mm/gmap.c
        hugepages=True,  # 4.19 KVM_CAP_S390_HPAGE_1M (new in 4.19)
        memslot_gpa_segment_rule=True,  # 4.19 gmap_map_segment via the by-segment harvest
        pte_soft_dirty=b._PAGE_SOFT_DIRTY,  # 4.19 asm/pgtable.h pte_mkdirty, defconfig
    ),
}
assert tuple(GENERATIONS) == KERNELS


def kernel_generation(name: str | None) -> KernelGeneration:
    """The generation called ``name`` (None: :data:`DEFAULT_KERNEL`); KvmShimError otherwise."""
    if name is None:
        name = DEFAULT_KERNEL
    try:
        return GENERATIONS[name]
    except (KeyError, TypeError):
        raise KvmShimError(
            f"unknown kernel {name!r} for the s390 model (choose from {', '.join(KERNELS)})"
        ) from None
