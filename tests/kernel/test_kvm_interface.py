"""The raw ioctls on the real kernel: manual protect, INITIALLY_SET, and why a VM cannot be
adopted by another process."""

import ctypes
import errno
import mmap
import os
import signal
import sys
import time

import pytest

from kvmshim import abi
from kvmshim.bitmap import DirtyBitmap
from kvmshim.errors import KvmError
from kvmshim.kvm import KvmDevice

MiB = 1 << 20


@pytest.fixture
def vm():
    dev = KvmDevice()
    vm = dev.create_vm()
    yield vm
    vm.close()
    dev.close()


def test_initially_set_starts_all_ones_and_clear_clears_exactly_what_it_names(vm):
    offered = vm.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    if not offered & abi.KVM_DIRTY_LOG_INITIALLY_SET:
        pytest.skip(f"this kernel offers manual-protect flags {offered:#x} without INITIALLY_SET")
    vm.enable_cap(
        abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET,
    )
    ram = mmap.mmap(-1, 1 * MiB)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    vm.set_user_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, MiB, addr)
    bm = DirtyBitmap(256)
    vm.get_dirty_log(0, bm.words)
    assert bm.count() == 256  # all ones
    vm.get_dirty_log(0, bm.words)
    assert bm.count() == 256  # GET does not clear
    # clear pages [64, 128) except 70: only those go
    mask = DirtyBitmap.from_pages(64, [p for p in range(64) if p != 6])
    vm.clear_dirty_log(0, 64, 64, mask.words)
    vm.get_dirty_log(0, bm.words)
    assert bm.pages().tolist() == [*range(64), 70, *range(128, 256)]
    with pytest.raises(KvmError) as info:
        vm.clear_dirty_log(0, 1, 64, mask.words)  # first page not a multiple of 64
    assert info.value.errno == errno.EINVAL
    vm.set_user_memory_region(0, 0, 0, 0, addr)
    del addr
    ram.close()


def test_get_dirty_log_errnos_from_the_kernel(vm):
    bm = DirtyBitmap(64)
    for slot, err in [
        (5, errno.ENOENT),
        (40000, errno.EINVAL),
        (abi.make_slot_id(5, 0), errno.EINVAL),
    ]:
        with pytest.raises(KvmError) as info:
            vm.get_dirty_log(slot, bm.words)
        assert info.value.errno == err, (slot, info.value)


def test_a_vm_fd_taken_from_another_process_is_useless(tmp_path):
    """Why the backend must own its VM: VM ioctls check the caller's mm (kvm_vm_ioctl: EIO)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the VM's creator
        try:
            dev = KvmDevice()
            vm = dev.create_vm()
            os.write(w, str(vm.fd).encode().ljust(16))
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        fd_number = int(os.read(r, 16).decode())
        pidfd = os.pidfd_open(pid)
        libc = ctypes.CDLL(None, use_errno=True)
        sys_pidfd_getfd = 438  # same number on x86-64, arm64 and s390x
        stolen = libc.syscall(sys_pidfd_getfd, pidfd, fd_number, 0)
        if stolen < 0:
            pytest.skip(f"pidfd_getfd failed: {os.strerror(ctypes.get_errno())}")
        from kvmshim.kvm import KvmVm

        foreign = KvmVm(KvmDevice(), stolen)
        with pytest.raises(KvmError) as info:
            foreign.check_extension(abi.KVM_CAP_NR_MEMSLOTS)
        assert info.value.errno == errno.EIO
        foreign.close()
        foreign.device.close()
        os.close(pidfd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    assert sys.platform == "linux"
