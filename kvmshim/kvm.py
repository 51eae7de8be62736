"""Thin, typed wrappers of the KVM ioctls: the device, a VM, a vCPU. Every failure is a KvmError
carrying the kernel's errno.

The device path is injectable (argument or $DIRTYLOGD_KVM_DEVICE) so tests can point it at a
missing or wrong file. Nothing here decides policy; :mod:`kvmshim.backends.kvm` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import struct

import numpy as np

from kvmshim import abi
from kvmshim.errors import KvmError
from kvmshim.x86 import abi as x86

DEVICE_ENV = "DIRTYLOGD_KVM_DEVICE"
DEFAULT_DEVICE = "/dev/kvm"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc.ioctl.restype = ctypes.c_int


def _ioctl(
    fd: int,
    request: int,
    arg: int | ctypes.Structure | bytearray,
    what: str,
    slot: int | None = None,
) -> int:
    """One ioctl. Integer arguments go through libc as unsigned long (fcntl.ioctl would pass a
    signed int); ctypes releases the GIL for the call, so a vCPU in KVM_RUN blocks no one."""
    while True:
        try:
            if isinstance(arg, int):
                result: int = _libc.ioctl(fd, request, arg)  # restype c_int: a Python int
                if result < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
                return result
            # A mutable buffer with mutate_flag=True: ioctl returns the kernel's int (typeshed
            # cannot tell mutable from read-only buffers here, so its stub says Any).
            returned: int = fcntl.ioctl(fd, request, arg, True)
            return returned
        except InterruptedError:
            continue
        except OSError as exc:
            raise KvmError.from_oserror(exc, f"{what} failed: {exc.strerror}", slot) from None


class KvmDevice:
    """An open /dev/kvm (system ioctls)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ.get(DEVICE_ENV) or DEFAULT_DEVICE
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = {
                errno.ENOENT: "is the kvm module loaded?",
                errno.EACCES: "is this user in the kvm group?",
            }.get(exc.errno or 0, "")
            raise KvmError(
                exc.errno or errno.EIO,
                f"cannot open {self.path}: {exc.strerror}; {hint}".rstrip("; "),
            ) from None
        try:
            version = fcntl.ioctl(self.fd, abi.KVM_GET_API_VERSION, 0)
        except OSError as exc:
            os.close(self.fd)
            raise KvmError(
                exc.errno or errno.ENOTTY, f"{self.path} is not a KVM device: {exc.strerror}"
            ) from None
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(errno.EINVAL, f"{self.path} speaks KVM API {version}, not 12")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> bytearray:
        """KVM_GET_SUPPORTED_CPUID as a kvm_cpuid2 buffer, ready for KVM_SET_CPUID2."""
        nent = 128
        while True:
            buf = bytearray(
                ctypes.sizeof(x86.kvm_cpuid2) + nent * ctypes.sizeof(x86.kvm_cpuid_entry2)
            )
            struct.pack_into("<I", buf, 0, nent)
            try:
                fcntl.ioctl(self.fd, x86.KVM_GET_SUPPORTED_CPUID, buf, True)
                return buf
            except OSError as exc:
                if exc.errno != errno.E2BIG or nent > 4096:
                    raise KvmError.from_oserror(exc, "KVM_GET_SUPPORTED_CPUID failed") from None
                nent *= 2

    def create_vm(self) -> KvmVm:
        return KvmVm(self, _ioctl(self.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVm:
    """VM ioctls. Only the process that created the VM may use them (EIO otherwise)."""

    def __init__(self, device: KvmDevice, fd: int) -> None:
        self.device = device
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def enable_cap(self, cap: int, *args: int) -> None:
        req = abi.kvm_enable_cap(cap=cap)
        for i, value in enumerate(args):
            req.args[i] = value
        _ioctl(self.fd, abi.KVM_ENABLE_CAP, req, f"KVM_ENABLE_CAP({cap})")

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        region = abi.kvm_userspace_memory_region(
            slot, flags, guest_phys_addr, memory_size, userspace_addr
        )
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION", slot)

    def get_dirty_log(self, slot: int, words: np.ndarray) -> None:
        """KVM_GET_DIRTY_LOG straight into ``words`` (it must hold the slot's whole bitmap)."""
        log = abi.kvm_dirty_log(slot=slot, dirty_bitmap=words.ctypes.data)
        _ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG", slot)

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, words: np.ndarray
    ) -> None:
        log = abi.kvm_clear_dirty_log(
            slot=slot, num_pages=num_pages, first_page=first_page, dirty_bitmap=words.ctypes.data
        )
        _ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, log, "KVM_CLEAR_DIRTY_LOG", slot)

    def get_skeys(self, start_gfn: int, keys: np.ndarray) -> bool:
        """KVM_S390_GET_SKEYS of ``keys.size`` frames into ``keys`` (uint8, contiguous); False
        if the guest uses no storage keys (the ioctl returned KVM_S390_GET_SKEYS_NONE)."""
        args = abi.kvm_s390_skeys(
            start_gfn=start_gfn, count=keys.size, skeydata_addr=keys.ctypes.data
        )
        return (
            _ioctl(self.fd, abi.KVM_S390_GET_SKEYS, args, "KVM_S390_GET_SKEYS")
            != abi.KVM_S390_GET_SKEYS_NONE
        )

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        return Vcpu(vcpu_id, fd, self.device.vcpu_mmap_size())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    def __init__(self, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.id = vcpu_id
        self.fd = fd
        self.run_area = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def set_cpuid(self, cpuid: bytearray) -> None:
        _ioctl(self.fd, x86.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_sregs(self) -> x86.kvm_sregs:
        sregs = x86.kvm_sregs()
        _ioctl(self.fd, x86.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: x86.kvm_sregs) -> None:
        _ioctl(self.fd, x86.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def set_regs(self, regs: x86.kvm_regs) -> None:
        _ioctl(self.fd, x86.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_regs(self) -> x86.kvm_regs:
        regs = x86.kvm_regs()
        _ioctl(self.fd, x86.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def describe_exit(self, reason: int) -> str:
        """A person-readable account of an unexpected exit (for error messages)."""
        name = x86.KVM_EXIT_REASONS.get(reason, str(reason))
        text = f"KVM_EXIT_{name} at rip {self.get_regs().rip:#x}"
        if reason == x86.KVM_EXIT_MMIO:
            (addr,) = struct.unpack_from("<Q", self.run_area, x86.KVM_RUN_EXIT_UNION)
            is_write = self.run_area[x86.KVM_RUN_EXIT_UNION + 20]
            text += f", {'store to' if is_write else 'load from'} unbacked address {addr:#x}"
        return text

    def run(self) -> tuple[int, int]:
        """KVM_RUN once (the GIL is released while the guest runs); (exit reason, I/O port)."""
        _ioctl(self.fd, abi.KVM_RUN, 0, "KVM_RUN")
        reason = struct.unpack_from("<I", self.run_area, x86.KVM_RUN_EXIT_REASON)[0]
        port = struct.unpack_from("<H", self.run_area, x86.KVM_RUN_IO_PORT)[0]
        return reason, port

    def close(self) -> None:
        self.run_area.close()
        os.close(self.fd)
