"""The generations table: one entry per kernel, the seed's differences and nothing else."""

import dataclasses

import pytest

from kvmshim.errors import KvmShimError
from kvmshim.s390 import bits as b
from kvmshim.s390 import reference as ref
from kvmshim.s390.generations import (
    DEFAULT_KERNEL,
    GENERATIONS,
    KERNELS,
    KernelGeneration,
    kernel_generation,
)


def test_every_kernel_has_a_generation_and_an_oracle():
    assert KERNELS == ("3.15", "3.16", "4.19") and DEFAULT_KERNEL == "3.16"
    assert tuple(GENERATIONS) == KERNELS == tuple(ref.PGTABLE)
    assert all(GENERATIONS[k].name == k for k in KERNELS)


def test_generations_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GENERATIONS["3.16"].harvest_bit = 0  # type: ignore[misc]


def test_the_default_and_an_unknown_name():
    assert kernel_generation(None) is GENERATIONS["3.16"]
    with pytest.raises(KvmShimError, match=r"unknown kernel '5\.4'.*3\.15, 3\.16, 4\.19"):
        kernel_generation("5.4")


def test_the_two_generations_differ_exactly_where_the_seed_changed_the_code():
    old, new = GENERATIONS["3.15"], GENERATIONS["3.16"]
    differ = {
        f.name
        for f in dataclasses.fields(KernelGeneration)
        if getattr(old, f.name) != getattr(new, f.name)
    }
    assert differ == {
        "name",
        "source",
        "pgste_in_bit",
        "user_dirty_bit",
        "harvest_bit",
        "key_change_bit",
        "pgste_initial",
        "update_all_moves_host_rc",
        "set_key_copies_guest_rc",
        "force_dirty_on_invalid",
        "harvest_folds_key",
        "harvest_protects",
    }
    assert old.pgste_in_bit == b.PGSTE_IN_BIT_315 == new.harvest_bit == b.PGSTE_UC_BIT
    assert (
        old.harvest_bit == b.PGSTE_HC_BIT and old.pgste_initial == b.PGSTE_HR_BIT | old.harvest_bit
    )


def test_what_4_19_changed_after_the_seed():
    seed, later = GENERATIONS["3.16"], GENERATIONS["4.19"]
    differ = {
        f.name
        for f in dataclasses.fields(KernelGeneration)
        if getattr(seed, f.name) != getattr(later, f.name)
    }
    # The PGSTE bits and the harvest's test-and-clear are the seed's; what changed is around them.
    assert differ == {
        "name",
        "source",
        "xchg_commit_keys",
        "notify_arm_sets_pte",
        "sync_dirty_log_by_segment",
        "hugepages",
        "memslot_gpa_segment_rule",
        "pte_soft_dirty",
    }
    assert [k for k in KERNELS if GENERATIONS[k].hugepages] == ["4.19"]
