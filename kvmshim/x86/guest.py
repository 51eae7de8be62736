"""The x86-64 guest program that makes real guest stores for the kvm backend.

Each vCPU loops over a mailbox in guest memory (its base in r15): the host fills in a command,
runs the vCPU, and the guest executes it and exits with ``out 0x10, al``.

    op 1 STAMP  count = number of gfns, stamp = u64; gfns follow at +64:
                store the stamp into the first 8 bytes of each page
    op 2 COPY   count = bytes, src = guest address of the staged data (inside the mailbox),
                dst = guest address: rep movsb

The guest runs in 64-bit long mode, set up through KVM_SET_SREGS without a GDT, with
identity-mapped 2 MiB pages over the first 512 GiB, so any memslot there is addressable.
Code, page tables and mailboxes live in a private memslot at 511 GiB (the "system slot").
The instruction bytes are written out below with their encodings; a test disassembles them
with objdump.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvmshim.x86.abi import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    kvm_regs,
    kvm_sregs,
)

GiB = 1 << 30
MiB = 1 << 20
IDENTITY_MAP_BYTES = 512 * GiB  # one PML4 entry, 512 PDPT entries, 2 MiB pages
SYSTEM_GPA = 511 * GiB
CODE_OFFSET = 0x0000
PML4_OFFSET = 0x1000
PDPT_OFFSET = 0x2000
PD_OFFSET = 0x3000  # 512 page directories follow
MAILBOX_OFFSET = 3 * MiB
MAILBOX_SIZE = 1 * MiB
MAX_VCPUS = 16
SYSTEM_SIZE = MAILBOX_OFFSET + MAX_VCPUS * MAILBOX_SIZE

# Mailbox fields (u64) and areas.
OP, COUNT, STAMP_OR_SRC, DST = 0, 8, 16, 24
GFN_LIST = 64
DATA_AREA = 512 * 1024  # COPY data is staged here
MAX_GFNS = (DATA_AREA - GFN_LIST) // 8
MAX_COPY = MAILBOX_SIZE - DATA_AREA
OP_STAMP, OP_COPY = 1, 2
EXIT_PORT = 0x10

PTE_PRESENT, PTE_WRITE, PTE_LARGE = 0x1, 0x2, 0x80


@dataclass(frozen=True)
class Jump:
    opcode: int  # one-byte opcode taking a rel8 operand: EB jmp, 74 jz, 75 jne
    target: str


def assemble(items: list[bytes | str | Jump]) -> bytes:
    """Bytes, label names and short jumps; two passes resolve the rel8 offsets."""
    labels: dict[str, int] = {}
    pos = 0
    for item in items:
        if isinstance(item, str):
            labels[item] = pos
        else:
            pos += 2 if isinstance(item, Jump) else len(item)
    out = bytearray()
    for item in items:
        if isinstance(item, Jump):
            rel = labels[item.target] - (len(out) + 2)
            assert -128 <= rel < 128, f"jump to {item.target} is out of rel8 range"
            out += bytes((item.opcode, rel & 0xFF))
        elif isinstance(item, bytes):
            out += item
    return bytes(out)


PROGRAM = assemble(
    [
        "loop",
        bytes.fromhex("4c89fe"),  # mov rsi, r15          the mailbox
        bytes.fromhex("488b06"),  # mov rax, [rsi]        op
        bytes.fromhex("4883f801"),  # cmp rax, 1
        Jump(0x75, "not_stamp"),  # jne not_stamp
        bytes.fromhex("488b4e08"),  # mov rcx, [rsi+8]    count
        bytes.fromhex("488b5610"),  # mov rdx, [rsi+16]   stamp
        bytes.fromhex("488d5e40"),  # lea rbx, [rsi+64]   gfn list
        "next",
        bytes.fromhex("4885c9"),  # test rcx, rcx
        Jump(0x74, "done"),  # jz done
        bytes.fromhex("488b3b"),  # mov rdi, [rbx]        gfn
        bytes.fromhex("48c1e70c"),  # shl rdi, 12         its guest address
        bytes.fromhex("488917"),  # mov [rdi], rdx        the store KVM logs
        bytes.fromhex("4883c308"),  # add rbx, 8
        bytes.fromhex("48ffc9"),  # dec rcx
        Jump(0xEB, "next"),  # jmp next
        "not_stamp",
        bytes.fromhex("4883f802"),  # cmp rax, 2
        Jump(0x75, "done"),  # jne done
        bytes.fromhex("488b4e08"),  # mov rcx, [rsi+8]    length
        bytes.fromhex("488b7e18"),  # mov rdi, [rsi+24]   destination
        bytes.fromhex("488b7610"),  # mov rsi, [rsi+16]   staged source
        bytes.fromhex("fc"),  # cld
        bytes.fromhex("f3a4"),  # rep movsb
        "done",
        bytes((0xE6, EXIT_PORT)),  # out 0x10, al        back to the host
        Jump(0xEB, "loop"),  # jmp loop
    ]
)


def write_page_tables(system_words: np.ndarray) -> None:
    """Identity-map [0, 512 GiB) with 2 MiB pages; ``system_words`` is the slot as <u8."""
    pd_entries = 512 * 512
    base = PD_OFFSET // 8
    frames = np.arange(pd_entries, dtype=np.uint64) << np.uint64(21)
    system_words[base : base + pd_entries] = frames | np.uint64(PTE_PRESENT | PTE_WRITE | PTE_LARGE)
    pd_gpas = SYSTEM_GPA + PD_OFFSET + np.arange(512, dtype=np.uint64) * np.uint64(4096)
    pdpt = PDPT_OFFSET // 8
    system_words[pdpt : pdpt + 512] = pd_gpas | np.uint64(PTE_PRESENT | PTE_WRITE)
    system_words[PML4_OFFSET // 8] = np.uint64(SYSTEM_GPA + PDPT_OFFSET) | np.uint64(
        PTE_PRESENT | PTE_WRITE
    )


def long_mode_sregs(sregs: kvm_sregs) -> None:
    """64-bit flat segments and paging, in place on the vCPU's current sregs."""
    for seg, selector, code in (
        (sregs.cs, 0x8, True),
        (sregs.ds, 0x10, False),
        (sregs.es, 0x10, False),
        (sregs.fs, 0x10, False),
        (sregs.gs, 0x10, False),
        (sregs.ss, 0x10, False),
    ):
        seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, selector
        seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
        seg.type = 0xB if code else 0x3  # execute/read or read/write, accessed
        seg.l, seg.db = (1, 0) if code else (0, 1)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.cr3 = SYSTEM_GPA + PML4_OFFSET
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


def initial_regs(vcpu: int) -> kvm_regs:
    regs = kvm_regs()
    regs.rip = SYSTEM_GPA + CODE_OFFSET
    regs.rflags = 0x2  # interrupts off
    regs.r15 = SYSTEM_GPA + mailbox_offset(vcpu)
    regs.rsp = regs.r15 + MAILBOX_SIZE
    return regs


def mailbox_offset(vcpu: int) -> int:
    if not 0 <= vcpu < MAX_VCPUS:
        raise ValueError(f"vcpu {vcpu} outside 0..{MAX_VCPUS - 1}")
    return MAILBOX_OFFSET + vcpu * MAILBOX_SIZE
