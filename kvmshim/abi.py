"""The KVM userspace ABI used for dirty logging: ioctl numbers, struct layouts, flags, caps.

Values are from include/uapi/linux/kvm.h (checked against Linux 6.1 headers, see
kernel-semantics §6). The ioctl encoding is the generic _IOC one, which s390 and x86 share.
"""

from __future__ import annotations

import ctypes

# --- generic _IOC encoding (include/uapi/asm-generic/ioctl.h) ---------------------------------
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (size << _IOC_SIZESHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOW(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO = 0xAE
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
BITS_PER_LONG = 64


# --- structures ------------------------------------------------------------------------------
class kvm_dirty_log(ctypes.Structure):
    """KVM_GET_DIRTY_LOG argument; the union {void *dirty_bitmap; u64 padding2} is a u64 here."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    )


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class kvm_enable_cap(ctypes.Structure):
    _fields_ = (
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    )


class kvm_s390_skeys(ctypes.Structure):
    """KVM_S390_GET_SKEYS / KVM_S390_SET_SKEYS argument: ``count`` keys of the frames from
    ``start_gfn``, one byte each, at ``skeydata_addr`` (Linux 4.19 include/uapi/linux/kvm.h,
    unchanged since commit 30ee2a984f07 added it; later kernels moved it to asm/kvm.h)."""

    _fields_ = (
        ("start_gfn", ctypes.c_uint64),
        ("count", ctypes.c_uint64),
        ("skeydata_addr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 9),
    )


class kvm_dirty_gfn(ctypes.Structure):
    """One dirty-ring entry (KVM_CAP_DIRTY_LOG_RING); listed for completeness, unused."""

    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("offset", ctypes.c_uint64),
    )


# --- ioctls ----------------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_RUN = _IO(KVMIO, 0x80)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _IO(KVMIO, 0xC7)
# s390 only, "Available with KVM_CAP_S390_SKEYS" (Linux 4.19 include/uapi/linux/kvm.h).
KVM_S390_GET_SKEYS = _IOW(KVMIO, 0xB2, kvm_s390_skeys)

KVM_API_VERSION = 12


# --- memory region flags ---------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# --- capabilities ----------------------------------------------------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_S390_GMAP = 71
KVM_CAP_S390_UCONTROL = 73
KVM_CAP_S390_COW = 79
KVM_CAP_S390_SKEYS = 110
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_S390_CMMA_MIGRATION = 145
KVM_CAP_S390_HPAGE_1M = 156
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT = 166  # obsolete v1
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225

# KVM_S390_GET_SKEYS / KVM_S390_SET_SKEYS (uapi linux/kvm.h; research kernel-419 §5). 4.19
# kvm-s390.c kvm_s390_get_skeys: flags must be 0 (EINVAL); KVM_S390_GET_SKEYS_NONE comes back,
# before the count is checked, when the guest never used a key instruction (!mm_uses_skeys);
# count must be 1..KVM_S390_SKEYS_MAX (EINVAL); a frame in no memslot is EFAULT.
KVM_S390_GET_SKEYS_NONE = 1  # GET_SKEYS' return value when the guest does not use keys
KVM_S390_SKEYS_MAX = 1048576  # most keys one GET/SET_SKEYS moves

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

KVM_EXIT_DIRTY_RING_FULL = 31


def make_slot_id(as_id: int, slot_id: int) -> int:
    """The ``slot`` field of the dirty-log structs: address space in bits 16-31, id in 0-15."""
    return (as_id << 16) | slot_id


def split_slot_id(slot: int) -> tuple[int, int]:
    """Inverse of :func:`make_slot_id`: ``(as_id, id)``."""
    return slot >> 16, slot & 0xFFFF


def dirty_bitmap_bytes(npages: int) -> int:
    """``kvm_dirty_bitmap_bytes``: ALIGN(npages, BITS_PER_LONG) / 8."""
    return (npages + BITS_PER_LONG - 1) // BITS_PER_LONG * (BITS_PER_LONG // 8)
