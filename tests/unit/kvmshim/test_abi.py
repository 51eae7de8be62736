"""The ABI module against the values kernel-semantics §6 took from the UAPI headers."""

import ctypes

import pytest

from kvmshim import abi


@pytest.mark.parametrize(
    ("struct", "size", "offsets"),
    [
        (abi.kvm_dirty_log, 16, {"slot": 0, "padding1": 4, "dirty_bitmap": 8}),
        (
            abi.kvm_clear_dirty_log,
            24,
            {"slot": 0, "num_pages": 4, "first_page": 8, "dirty_bitmap": 16},
        ),
        (
            abi.kvm_userspace_memory_region,
            32,
            {"slot": 0, "flags": 4, "guest_phys_addr": 8, "memory_size": 16, "userspace_addr": 24},
        ),
        (abi.kvm_enable_cap, 104, {"cap": 0, "flags": 4, "args": 8, "pad": 40}),
        (abi.kvm_dirty_gfn, 16, {"flags": 0, "slot": 4, "offset": 8}),
        (
            abi.kvm_s390_skeys,
            64,
            {"start_gfn": 0, "count": 8, "skeydata_addr": 16, "flags": 24, "reserved": 28},
        ),
    ],
)
def test_struct_layout_matches_uapi(struct, size, offsets):
    assert ctypes.sizeof(struct) == size
    for name, offset in offsets.items():
        assert getattr(struct, name).offset == offset, name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_CHECK_EXTENSION", 0xAE03),
        ("KVM_GET_DIRTY_LOG", 0x4010AE42),
        ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
        ("KVM_ENABLE_CAP", 0x4068AEA3),
        ("KVM_CLEAR_DIRTY_LOG", 0xC018AEC0),
        ("KVM_RESET_DIRTY_RINGS", 0xAEC7),
        ("KVM_CREATE_VM", 0xAE01),
        ("KVM_RUN", 0xAE80),
        ("KVM_S390_GET_SKEYS", 0x4040AEB2),
    ],
)
def test_ioctl_numbers_encode_like_the_kernel(name, value):
    assert getattr(abi, name) == value


def test_capability_and_flag_values():
    assert abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 == 168
    assert abi.KVM_CAP_NR_MEMSLOTS == 10
    assert abi.KVM_CAP_MULTI_ADDRESS_SPACE == 118
    assert abi.KVM_CAP_S390_COW == 79
    assert abi.KVM_CAP_DIRTY_LOG_RING == 192
    assert abi.KVM_CAP_S390_SKEYS == 110
    assert (abi.KVM_S390_GET_SKEYS_NONE, abi.KVM_S390_SKEYS_MAX) == (1, 1 << 20)
    assert abi.KVM_MEM_LOG_DIRTY_PAGES == 1
    assert abi.KVM_MEM_READONLY == 2
    assert abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE == 1
    assert abi.KVM_DIRTY_LOG_INITIALLY_SET == 2


def test_slot_id_packs_address_space_in_the_high_half():
    assert abi.make_slot_id(1, 3) == 0x10003
    assert abi.split_slot_id(0x10003) == (1, 3)


@pytest.mark.parametrize(("npages", "nbytes"), [(0, 0), (1, 8), (64, 8), (65, 16), (4099, 520)])
def test_dirty_bitmap_bytes_is_whole_longs(npages, nbytes):
    assert abi.dirty_bitmap_bytes(npages) == nbytes
