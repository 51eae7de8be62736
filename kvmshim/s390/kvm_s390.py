"""What arch/s390/kvm/kvm-s390.c adds to the generic memslot and dirty-log rules: pure functions
over memslots, for the model and for a real s390 KVM alike.

* :func:`kvm_arch_prepare_memory_region`: a slot's host address and size must be 1 MiB aligned
  (EINVAL). The text is the same in every tree read, 3.10.65 through 3.18.30 (research
  kernel-315-316 §4.3); the version that introduced it was not established.
* :func:`sync_dirty_log_overreach`: ``kvm_s390_sync_dirty_log`` (new in 3.16.0, never changed to
  ``<``) loops ``cur_gfn <= last_gfn`` with ``last_gfn = base_gfn + npages``: one gfn past the
  slot. That iteration test-and-clears the host page right after the slot's userspace range and,
  if it was dirty, marks gfn ``base_gfn + npages`` in whichever slot holds that gfn (§4.2).
* 4.19 (:func:`guest_segment_after`): the loop steps by 1 MiB guest segments
  (``gmap_sync_dirty_log_pmd``), still ``cur_gfn <= last_gfn``; its extra iteration walks the
  gmap to the guest segment after the slot and marks those 256 gfns, so they reach their own
  slot's bitmap, unless that slot does not log dirty pages.
* :func:`gmap_map_segment_rule` (the model's, for 4.19): a slot whose guest address is not
  1 MiB aligned is accepted by ``kvm_arch_prepare_memory_region`` but ``gmap_map_segment``
  refuses to map it in ``kvm_arch_commit_memory_region`` (which only prints an error), so the
  guest could never touch it; the model refuses it with EINVAL instead.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

import numpy as np

from kvmshim.abi import PAGE_SHIFT, PAGE_SIZE
from kvmshim.errors import KvmError
from kvmshim.memslot import Memslot

SEGMENT_SIZE = 1 << 20  # a 1 MiB segment: one page table, 256 pages


def kvm_arch_prepare_memory_region(slot: int, userspace_addr: int, memory_size: int) -> None:
    """EINVAL unless ``userspace_addr`` and ``memory_size`` are multiples of 1 MiB.

    The guest address is not checked here (the generic code wants 4 KiB only).
    """
    if userspace_addr % SEGMENT_SIZE:
        raise KvmError(
            errno.EINVAL,
            f"s390 memslots start at a 1 MiB boundary of host memory (at {userspace_addr:#x})",
            slot,
        )
    if memory_size % SEGMENT_SIZE:
        raise KvmError(
            errno.EINVAL, f"s390 memslots are 1 MiB multiples (size {memory_size:#x})", slot
        )


def gmap_map_segment_rule(slot: int, guest_phys_addr: int) -> None:
    """EINVAL unless ``guest_phys_addr`` is a multiple of 1 MiB (see the module docstring)."""
    if guest_phys_addr % SEGMENT_SIZE:
        raise KvmError(
            errno.EINVAL,
            f"the gmap maps 1 MiB guest segments: guest address {guest_phys_addr:#x} is not "
            "1 MiB aligned",
            slot,
        )


def guest_segment_after(
    slots: Iterable[Memslot], slot: Memslot
) -> tuple[Memslot, np.ndarray] | None:
    """The slot holding the guest segment just past ``slot`` and its pages there, if any: what
    the extra iteration of 4.19's kvm_s390_sync_dirty_log test-and-clears."""
    gfn = slot.base_gfn + slot.npages
    for other in slots:
        if other.slot != slot.slot and other.base_gfn <= gfn < other.base_gfn + other.npages:
            first = gfn - other.base_gfn
            pages = np.arange(first, min(first + SEGMENT_SIZE // PAGE_SIZE, other.npages))
            return other, pages
    return None


def host_page_after(slots: Iterable[Memslot], slot: Memslot) -> list[tuple[Memslot, int]]:
    """The (memslot, page) pairs backed by the host page just past ``slot``'s userspace range.

    That is the page the extra iteration of kvm_s390_sync_dirty_log test-and-clears (several
    slots may alias one host page).
    """
    hva = slot.userspace_addr + slot.npages * PAGE_SIZE
    return [
        (other, (hva - other.userspace_addr) >> PAGE_SHIFT)
        for other in slots
        if other.slot != slot.slot
        and other.userspace_addr <= hva < other.userspace_addr + other.memory_size
    ]


def sync_dirty_log_overreach(
    slots: Iterable[Memslot], slot: Memslot, by_segment: bool = False
) -> list[tuple[int, int]]:
    """(slot, page) pairs whose dirty state a GET_DIRTY_LOG of ``slot`` consumes unreported.

    The extra iteration clears the dirty state of the host page after ``slot`` and marks gfn
    ``base_gfn + npages``. The owner of that host page gets it back only if that gfn is its own
    gfn for the page (adjacent in guest and host memory) and it logs dirty pages
    (mark_page_dirty_in_slot drops a mark for a slot without a dirty bitmap); otherwise the
    pair is returned, for the caller to mark dirty itself.
    """
    slots = list(slots)
    if by_segment:  # 4.19: the same gfns as the pages cleared, into their own slot if it logs
        after = guest_segment_after(slots, slot)
        if after is None or after[0].log_dirty_pages:
            return []
        return [(after[0].slot, int(page)) for page in after[1]]
    gfn = slot.base_gfn + slot.npages
    return [
        (other.slot, page)
        for other, page in host_page_after(slots, slot)
        if other.base_gfn + page != gfn or not other.log_dirty_pages or other.as_id != slot.as_id
    ]
