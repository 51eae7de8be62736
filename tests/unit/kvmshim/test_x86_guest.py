"""The x86 ABI structures and the guest program's bytes, checked against outside references."""

import ctypes
import subprocess

import numpy as np
import pytest

from kvmshim.x86 import abi, guest
from tests.conftest import need_tool


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (abi.kvm_regs, 144),
        (abi.kvm_segment, 24),
        (abi.kvm_dtable, 16),
        (abi.kvm_sregs, 312),
        (abi.kvm_cpuid_entry2, 40),
        (abi.kvm_cpuid2, 8),
    ],
)
def test_struct_sizes_match_the_uapi(struct, size):
    assert ctypes.sizeof(struct) == size


def test_ioctl_numbers():
    assert abi.KVM_GET_SREGS == 0x8138AE83
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_SET_REGS == 0x4090AE82
    assert abi.KVM_SET_CPUID2 == 0x4008AE90
    assert abi.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert abi.kvm_sregs.efer.offset == 264 and abi.kvm_sregs.cr3.offset == 240


EXPECTED = """\
mov %r15,%rsi
mov (%rsi),%rax
cmp $0x1,%rax
jne 0x30
mov 0x8(%rsi),%rcx
mov 0x10(%rsi),%rdx
lea 0x40(%rsi),%rbx
test %rcx,%rcx
je 0x45
mov (%rbx),%rdi
shl $0xc,%rdi
mov %rdx,(%rdi)
add $0x8,%rbx
dec %rcx
jmp 0x18
cmp $0x2,%rax
jne 0x45
mov 0x8(%rsi),%rcx
mov 0x18(%rsi),%rdi
mov 0x10(%rsi),%rsi
cld
rep movsb %ds:(%rsi),%es:(%rdi)
out %al,$0x10
jmp 0x0"""


def test_guest_program_disassembles_to_the_intended_instructions(tmp_path):
    objdump = need_tool("objdump")
    binary = tmp_path / "guest.bin"
    binary.write_bytes(guest.PROGRAM)
    out = subprocess.run(
        [objdump, "-D", "-b", "binary", "-m", "i386:x86-64", str(binary)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [
        " ".join(line.split("\t")[-1].split())
        for line in out.splitlines()
        if line.startswith("  ") and "\t" in line
    ]
    assert "\n".join(lines) == EXPECTED


def test_identity_map_covers_the_first_512_gib_with_2_mib_pages():
    words = np.zeros(guest.SYSTEM_SIZE // 8, dtype="<u8")
    guest.write_page_tables(words)
    pml4 = int(words[guest.PML4_OFFSET // 8])
    assert pml4 == guest.SYSTEM_GPA + guest.PDPT_OFFSET | 0x3

    def translate(vaddr):
        pdpte = int(words[guest.PDPT_OFFSET // 8 + (vaddr >> 30)])
        pd_index = (pdpte & ~0xFFF) - guest.SYSTEM_GPA
        pde = int(words[pd_index // 8 + ((vaddr >> 21) & 511)])
        assert pde & 0x83 == 0x83  # present, writable, 2 MiB
        return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (vaddr & 0x1FFFFF)

    for addr in (0, 0x1234_5678, 4 << 30, guest.SYSTEM_GPA + 0x100, (512 << 30) - 8):
        assert translate(addr) == addr
