"""The x86 part of the KVM ABI that running a guest needs: registers, segments, CPUID, kvm_run.

Layouts from arch/x86/include/uapi/asm/kvm.h and include/uapi/linux/kvm.h; the tests check
sizes and offsets. Only what the guest program of :mod:`kvmshim.x86.guest` uses is here.
"""

from __future__ import annotations

import ctypes

from kvmshim.abi import _IOR, _IOW, _IOWR, KVMIO


class kvm_regs(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    )


class kvm_segment(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class kvm_dtable(ctypes.Structure):
    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    )


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = (
        ("function", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("eax", ctypes.c_uint32),
        ("ebx", ctypes.c_uint32),
        ("ecx", ctypes.c_uint32),
        ("edx", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 3),
    )


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow it in the same buffer."""

    _fields_ = (("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32))


KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)

# struct kvm_run: exit_reason at 8; the exit union at 32; for KVM_EXIT_IO the union holds
# {u8 direction, u8 size, u16 port, u32 count, u64 data_offset}.
KVM_RUN_EXIT_REASON = 8
KVM_RUN_EXIT_UNION = 32
KVM_RUN_IO_PORT = KVM_RUN_EXIT_UNION + 2

KVM_EXIT_REASONS = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
}
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6

# Control-register and EFER bits for long mode.
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
