"""A real KVM VM, owned by this process, harvested with the real ioctls.

Every KVM VM ioctl fails with EIO unless the caller shares the mm of the process that created
the VM, so the backend cannot adopt someone else's VM: it creates its own, backs its memslots
with the same kind of RAM file as the software MMU, and runs real guest code
(:mod:`kvmshim.x86.guest`) on real vCPUs, so the dirty log KVM keeps is the one of real guest
stores. The kernel is the authority on every memslot and dirty-log rule; the table here only
mirrors what it accepted.

Harvest policy, by capability rather than architecture:
  * with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: GET (non-destructive), then CLEAR exactly the bits
    GET returned, which re-arms write protection for those pages;
  * without it (s390, old kernels): GET alone, which clears KVM's bitmap.
No store can fall between GET and CLEAR unseen:
  1. GET copies snapshot S.          A store to a page in S after this point changes a page the
  2. the caller ORs S into every     consumers will be told about; they copy pages only after
     consumer (after we return).     they have the answer, so they copy the new data.
  3. CLEAR(S) write-protects S.      A store to a page outside S sets a bit that CLEAR(S) does
                                     not touch, so the next GET returns it.
"""

from __future__ import annotations

import errno
import platform
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from kvmshim import abi
from kvmshim.backends.base import (
    BackendStats,
    Harvest,
    ReadPath,
    WorkloadSpec,
    WritePath,
)
from kvmshim.backends.guestvm import GuestVm, gfn_span
from kvmshim.backends.ram import Region
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import KvmError, NotSupportedError
from kvmshim.kvm import KvmDevice, Vcpu
from kvmshim.memslot import Change, Memslot, MemslotChange, MemslotTable
from kvmshim.s390.kvm_s390 import sync_dirty_log_overreach
from kvmshim.x86 import guest
from kvmshim.x86.abi import KVM_EXIT_IO

PAGE_SHIFT = abi.PAGE_SHIFT
# KVM turns guest accesses to the local APIC's page into MMIO exits even where a memslot covers
# it (seen on this machine with no in-kernel irqchip and the xAPIC disabled); real PC guests
# have no RAM there anyway (the PCI hole).
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
RESERVED_GFNS = np.array([APIC_DEFAULT_PHYS_BASE >> PAGE_SHIFT], dtype=np.int64)


class KvmBackend(GuestVm):
    """One VM created by this process on /dev/kvm."""

    kind = "kvm"
    max_gfn = (guest.IDENTITY_MAP_BYTES >> PAGE_SHIFT) - 1

    def __init__(
        self, name: str, runtime_dir: str, device: str | None = None, adopt: bool = False
    ) -> None:
        self.device = KvmDevice(device)
        self.arch = platform.machine()
        self.x86 = self.arch == "x86_64"
        try:
            self.vm = self.device.create_vm()
            self._caps = self._probe()
            self.manual_protect = bool(self._caps["manual-dirty-log-protect2"])
            if self.manual_protect:
                wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                if self._caps["manual-dirty-log-protect2"] & abi.KVM_DIRTY_LOG_INITIALLY_SET:
                    wanted |= abi.KVM_DIRTY_LOG_INITIALLY_SET
                self.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, wanted)
                self.initially_set = bool(wanted & abi.KVM_DIRTY_LOG_INITIALLY_SET)
            else:
                self.initially_set = False
        except BaseException:
            self.device.close()
            raise
        nr_slots = self._caps["nr-memslots"] or 32
        # The last slot id is the guest program's own memory (x86).
        self.system_slot = nr_slots - 1
        super().__init__(
            name,
            runtime_dir,
            MemslotTable(
                max_slots=self.system_slot if self.x86 else nr_slots,
                address_spaces=max(1, self._caps["multi-address-space"]),
            ),
            adopt,
        )
        self._vcpus: list[Vcpu] = []
        self._idle: queue.LifoQueue[Vcpu] = queue.LifoQueue()
        self._vcpu_lock = threading.Lock()
        self._system: Region | None = None
        self._cpuid: bytearray | None = None
        if self.x86:
            self._install_guest_program()

    def _probe(self) -> dict[str, int]:
        check = self.vm.check_extension
        return {
            "nr-memslots": check(abi.KVM_CAP_NR_MEMSLOTS),
            "multi-address-space": check(abi.KVM_CAP_MULTI_ADDRESS_SPACE),
            "manual-dirty-log-protect2": check(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
            "dirty-log-ring": check(abi.KVM_CAP_DIRTY_LOG_RING),
            "s390-cow": check(abi.KVM_CAP_S390_COW),
            "s390-skeys": check(abi.KVM_CAP_S390_SKEYS),
            "nr-vcpus": check(abi.KVM_CAP_NR_VCPUS),
        }

    def capabilities(self) -> dict[str, object]:
        return {
            **self._caps,
            "arch": self.arch,
            "manual-protect": self.manual_protect,
            "initially-set": self.initially_set,
            "vcpu-dirty-ring": self.has_dirty_ring,
            "guest-program": "x86-64 long mode" if self.x86 else None,
        }

    def _install_guest_program(self) -> None:
        system = self.ram.allocate_at(0, guest.SYSTEM_SIZE)  # always first in the RAM file
        system.bytes[: len(guest.PROGRAM)] = np.frombuffer(guest.PROGRAM, dtype=np.uint8)
        guest.write_page_tables(system.words)
        self.vm.set_user_memory_region(
            self.system_slot, 0, guest.SYSTEM_GPA, guest.SYSTEM_SIZE, system.bytes.ctypes.data
        )
        self._system = system
        self._cpuid = self.device.supported_cpuid()

    # --- memslots ---------------------------------------------------------------------------
    def _set_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, at: int | None
    ) -> MemslotChange:
        """The kernel decides; on success the mirror, the RAM and the write protection follow."""
        with self._lock:
            old = self.memslots.get(slot)
            fresh = None
            if old is None and memory_size:
                fresh = (
                    self.ram.allocate(memory_size)
                    if at is None
                    else self.ram.allocate_at(at, memory_size)
                )
            if old is not None:
                uaddr = old.userspace_addr
            else:
                uaddr = fresh.bytes.ctypes.data if fresh is not None else 0
            try:
                self.vm.set_user_memory_region(slot, flags, guest_phys_addr, memory_size, uaddr)
            except KvmError:
                if fresh is not None and at is None:  # never punch RAM we were asked to adopt
                    self.ram.release(fresh)
                raise
            change = _classify(old, slot, flags, guest_phys_addr, memory_size, uaddr)
            if change.kind is Change.CREATE:
                assert fresh is not None
                self._regions[slot] = fresh
            elif change.kind is Change.DELETE:
                self.ram.release(self._regions.pop(slot))
            self.memslots.commit(change)
            self._layout = None
            new = change.new
            if (
                new is not None
                and new.log_dirty_pages
                and (old is None or not old.log_dirty_pages)  # logging starts
                and self.initially_set
            ):
                self._arm(new)
            return change

    def _arm(self, memslot: Memslot) -> None:
        """INITIALLY_SET leaves a new bitmap all ones and nothing write-protected; clearing it
        starts tracking, as enabling logging does without manual protect."""
        ones = DirtyBitmap.ones(memslot.npages)
        self.vm.clear_dirty_log(memslot.slot, 0, memslot.npages, ones.words)

    # --- the dirty log ------------------------------------------------------------------------
    def get_dirty_log(self, slot: int) -> Harvest:
        with self._lock:
            memslot = self.memslots.get(slot)
        bitmap = DirtyBitmap(memslot.npages if memslot else 64)
        generation = self.generation
        self.vm.get_dirty_log(slot, bitmap.words)  # the kernel's errno for a bad slot
        if memslot is None:  # the kernel knew a slot the mirror did not: should not happen
            raise KvmError(errno.ENOENT, "slot unknown to the daemon", slot)
        if self.manual_protect and bitmap.any():
            self.vm.clear_dirty_log(slot, 0, memslot.npages, bitmap.words)
        self._closed_generation(generation, bitmap.count())
        return Harvest(bitmap, generation)

    def overreach(self, slot: int) -> list[tuple[int, int]]:
        """x86 has no inclusive harvest loop: []. On s390x the host kernel's
        kvm_s390_sync_dirty_log reaches one host page past the slot (every version so far)."""
        if self.arch != "s390x":
            return []
        with self._lock:
            memslot = self.memslots.get(slot)
            return [] if memslot is None else sync_dirty_log_overreach(self.memslots, memslot)

    def kvm_get_dirty_log(self, slot: int) -> DirtyBitmap:
        """The raw ioctl, nothing else (for tests and benchmarks)."""
        memslot = self.memslots.get(slot)
        bitmap = DirtyBitmap(memslot.npages if memslot else 64)
        self.vm.get_dirty_log(slot, bitmap.words)
        return bitmap

    def kvm_clear_dirty_log(self, slot: int, first_page: int, mask: DirtyBitmap) -> None:
        """The raw ioctl: clear the pages set in ``mask`` (bit 0 is first_page)."""
        self.vm.clear_dirty_log(slot, first_page, mask.npages, mask.words)

    def check_clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> None:
        """Validate CLEAR arguments with the kernel itself: a CLEAR of nothing changes nothing."""
        if not self.manual_protect:
            self.memslots.for_clear_dirty_log(slot, first_page, num_pages)
            return
        self.vm.clear_dirty_log(slot, first_page, num_pages, DirtyBitmap(num_pages).words)

    # --- guest stores and host-side writes -----------------------------------------------------
    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> None:
        """Store ``value`` into every page; None, not a count: KVM's dirty bitmap attributes no
        page to the store (or vCPU) that dirtied it, and this backend uses no dirty ring."""
        gfns = np.asarray(gfns, dtype=np.int64)
        located = list(self._locate(gfns))
        if path is WritePath.GUEST:
            self._need_guest_program("guest stores")
            self._refuse_reserved(gfns)
            for start in range(0, gfns.size, guest.MAX_GFNS):
                self._run_stamp(gfns[start : start + guest.MAX_GFNS], value)
        else:  # the host writes through its own mapping: KVM does not see it
            stamp = np.uint64(value)
            for slot, pages in located:
                self._regions[slot].words[pages * (abi.PAGE_SIZE // 8)] = stamp
        self._writes[path] += gfns.size

    def write(self, gpa: int, data: bytes, path: WritePath) -> np.ndarray:
        spans = self._spans(gpa, len(data))
        if path is WritePath.GUEST:
            self._need_guest_program("guest stores")
            self._refuse_reserved(gfn_span(gpa, len(data)))
            for offset in range(0, len(data), guest.MAX_COPY):
                self._run_copy(gpa + offset, data[offset : offset + guest.MAX_COPY])
        else:
            for span in spans:
                self._regions[span.slot].bytes[span.offset : span.offset + span.hi - span.lo] = (
                    np.frombuffer(data, np.uint8, span.hi - span.lo, span.lo - gpa)
                )
        gfns = gfn_span(gpa, len(data))
        self._writes[path] += gfns.size
        return gfns

    def read(self, gpa: int, length: int, path: ReadPath) -> bytes:
        if path is ReadPath.GUEST:
            raise NotSupportedError(
                "guest loads through the MMU exist only in the s390 model (backend 'softmmu'); "
                "the kvm backend reads host-side (path 'host')"
            )
        return self._read_host(gpa, length)

    def set_storage_key(self, gpa: int, key: int) -> None:
        raise NotSupportedError("storage keys exist only in the s390 model (backend 'softmmu')")

    def saved_storage_keys(self) -> dict[int, bytes]:
        return {}  # the kernel keeps a real guest's keys across the daemon's restart

    def restore_storage_keys(self, slot: int, keys: bytes) -> None:
        raise NotSupportedError("the kvm backend's keys stay in the kernel")

    def get_storage_keys(self, start_gfn: int, count: int) -> np.ndarray | None:
        """KVM_S390_GET_SKEYS on an s390x host; no other architecture has storage keys."""
        if not self._caps["s390-skeys"]:
            raise NotSupportedError(
                f"this backend has no storage keys: KVM on {self.arch} has no "
                "KVM_S390_GET_SKEYS (keys are s390's; the s390 model, backend 'softmmu', "
                "has them)"
            )
        if not 1 <= count <= abi.KVM_S390_SKEYS_MAX:  # the kernel's EINVAL, before allocating
            raise KvmError(
                errno.EINVAL, f"a count of {count} keys is outside 1..{abi.KVM_S390_SKEYS_MAX}"
            )
        keys = np.zeros(count, dtype=np.uint8)
        return keys if self.vm.get_skeys(start_gfn, keys) else None

    def _refuse_reserved(self, gfns: np.ndarray) -> None:
        if np.isin(RESERVED_GFNS, gfns).any():
            raise KvmError(
                errno.EFAULT,
                f"guest address {APIC_DEFAULT_PHYS_BASE:#x} is the local APIC's page: "
                "KVM makes guest accesses there MMIO, not RAM",
            )

    def _workload_store(self, gfns: np.ndarray, stamp: int, path: WritePath) -> int | None:
        """The simulated guest simply never touches the APIC page."""
        return super()._workload_store(gfns[~np.isin(gfns, RESERVED_GFNS)], stamp, path)

    def _need_guest_program(self, what: str) -> None:
        if not self.x86:
            raise NotSupportedError(f"{what} need a guest program; there is none for {self.arch}")

    # --- vCPUs running the guest program ---------------------------------------------------------
    @contextmanager
    def _vcpu(self) -> Iterator[Vcpu]:
        try:
            vcpu = self._idle.get_nowait()
        except queue.Empty:
            with self._vcpu_lock:
                fresh = self._new_vcpu() if len(self._vcpus) < guest.MAX_VCPUS else None
            vcpu = fresh if fresh is not None else self._idle.get()
        try:
            yield vcpu
        finally:
            self._idle.put(vcpu)

    def _new_vcpu(self) -> Vcpu:
        vcpu = self.vm.create_vcpu(len(self._vcpus))
        assert self._cpuid is not None
        vcpu.set_cpuid(self._cpuid)
        sregs = vcpu.get_sregs()
        guest.long_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(guest.initial_regs(vcpu.id))
        self._vcpus.append(vcpu)
        return vcpu

    def _mailbox(self, vcpu: Vcpu) -> tuple[np.ndarray, int]:
        assert self._system is not None
        offset = guest.mailbox_offset(vcpu.id)
        return self._system.words[offset // 8 : (offset + guest.MAILBOX_SIZE) // 8], offset

    def _run_stamp(self, gfns: np.ndarray, value: int) -> None:
        with self._vcpu() as vcpu:
            box, _ = self._mailbox(vcpu)
            box[guest.GFN_LIST // 8 : guest.GFN_LIST // 8 + gfns.size] = gfns.astype(np.uint64)
            box[guest.COUNT // 8] = gfns.size
            box[guest.STAMP_OR_SRC // 8] = np.uint64(value)
            box[guest.OP // 8] = guest.OP_STAMP
            self._run(vcpu)

    def _run_copy(self, gpa: int, data: bytes) -> None:
        with self._vcpu() as vcpu:
            box, offset = self._mailbox(vcpu)
            staged = box.view(np.uint8)[guest.DATA_AREA : guest.DATA_AREA + len(data)]
            staged[:] = np.frombuffer(data, dtype=np.uint8)
            box[guest.COUNT // 8] = len(data)
            box[guest.STAMP_OR_SRC // 8] = guest.SYSTEM_GPA + offset + guest.DATA_AREA
            box[guest.DST // 8] = gpa
            box[guest.OP // 8] = guest.OP_COPY
            self._run(vcpu)

    def _run(self, vcpu: Vcpu) -> None:
        reason, port = vcpu.run()
        if reason != KVM_EXIT_IO or port != guest.EXIT_PORT:
            raise KvmError(errno.EIO, f"vcpu {vcpu.id} stopped: {vcpu.describe_exit(reason)}")

    # --- workload ------------------------------------------------------------------------------
    def start_workload(self, spec: WorkloadSpec) -> None:
        self._need_guest_program("the workload")
        if spec.vcpus >= guest.MAX_VCPUS:
            raise NotSupportedError(f"at most {guest.MAX_VCPUS - 1} vCPUs for the workload")
        super().start_workload(spec)

    def stats(self) -> BackendStats:
        return BackendStats(
            harvests=self._harvests,
            harvested_dirty_pages=self._harvested,
            writes_by_path=dict(self._writes),
        )

    def close(self, keep_ram: bool = False) -> None:
        self.stop_workload()
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        self.vm.close()
        self.device.close()
        self._close_common(keep_ram)


def _classify(
    old: Memslot | None, slot: int, flags: int, gpa: int, size: int, uaddr: int
) -> MemslotChange:
    """What the kernel just did, for the mirror (the kernel already validated it)."""
    as_id, slot_id = abi.split_slot_id(slot)
    if size == 0:
        return MemslotChange(Change.DELETE, old, None)
    new = Memslot(as_id, slot_id, gpa, size, flags, uaddr)
    if old is None:
        return MemslotChange(Change.CREATE, None, new)
    if gpa != old.guest_phys_addr:
        return MemslotChange(Change.MOVE, old, new)
    if flags != old.flags:
        return MemslotChange(Change.FLAGS_ONLY, old, new)
    return MemslotChange(Change.NONE, old, old)
