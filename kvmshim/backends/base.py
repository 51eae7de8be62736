"""The Backend protocol: what the daemon needs from a VM, whatever produces its dirty bits.

A backend owns one VM: its memslots, its guest RAM, its vCPUs. ``get_dirty_log`` is destructive,
like KVM_GET_DIRTY_LOG without manual protect: it returns every page dirtied since the previous
call for that slot. The daemon fans the result out to its consumers.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from kvmshim.backends.vcpu_control import RingSnapshot, VcpuControls, VcpuRate
from kvmshim.bitmap import DirtyBitmap
from kvmshim.memslot import MemslotChange, MemslotTable


class WritePath(enum.StrEnum):
    """Who stores: the guest through its address space, or something that bypasses it."""

    GUEST = "guest"  # through DAT: faults, UC (or the KVM dirty log)
    DMA = "dma"  # device I/O into guest frames: the seed's documented gap
    KERNEL = "kernel"  # the host kernel's own mapping of pinned guest pages: the same gap


class ReadPath(enum.StrEnum):
    HOST = "host"  # the migration tool's view: no MMU effect
    GUEST = "guest"  # a guest load through DAT (s390 model only)


class Pattern(enum.StrEnum):
    RANDOM = "random"
    SEQUENTIAL = "sequential"
    HOT_SET = "hot-set"


# Called with the guest frame numbers a reported DMA/kernel store touched, after the data landed.
IoReporter = Callable[[np.ndarray], None]
# Called from a dying vCPU thread with its index and what killed it.
VcpuFailureHook = Callable[[int, BaseException], None]


@dataclass(frozen=True)
class WorkloadSpec:
    """A simulated guest that keeps storing generation stamps into its pages."""

    pages_per_second: int
    vcpus: int = 1
    pattern: Pattern = Pattern.RANDOM
    seed: int | None = None
    hot_fraction: float = 1 / 16  # hot-set: share of pages that take HOT_SHARE of the stores
    dma_share: float = 0.0  # share of stores that are device writes (path "dma")
    dma_report: bool = True  # whether those device writes are reported to the I/O log


@dataclass(frozen=True)
class WorkloadStatus:
    """The simulated vCPUs as they are now: what was asked, how far they got, why they died."""

    spec: WorkloadSpec
    running: bool
    pages_stored: int
    failure: BaseException | None


@dataclass(frozen=True)
class Harvest:
    """One destructive harvest: the slot's dirty bitmap and the stamp generation it closed."""

    bitmap: DirtyBitmap
    generation: int


@dataclass
class RamRegion:
    """Where a memslot's RAM lives in the VM's RAM file, for tools that map it read-only."""

    path: str
    offset: int
    size: int


@dataclass
class BackendStats:
    """Counters a backend keeps for metrics, read at scrape time."""

    harvests: int = 0
    harvested_dirty_pages: int = 0
    writes_by_path: dict[str, int] = field(default_factory=dict)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    ipte_notifications: int = 0


class Backend(Protocol):
    """A VM whose dirty pages the daemon serves: the whole contract, for every backend.

    The daemon uses nothing else of a backend: no attribute probes, no private fields.
    """

    kind: str
    memslots: MemslotTable
    generation: int  # the stamp the next guest store carries
    vcpu_failures: int  # vCPU threads that died since the VM was created
    io_reporter: IoReporter | None  # set by the daemon: where reported DMA stores go
    on_vcpu_failure: VcpuFailureHook | None  # set by the daemon: told of a dying vCPU
    # Whether stores report the pages they newly dirtied per vCPU (a dirty ring): dirty limits
    # need it; the cpu throttle does not.
    has_dirty_ring: bool
    vcpu_controls: VcpuControls  # throttle, dirty limits, period; survives workload restarts

    @property
    def ram_path(self) -> str:
        """The file holding guest RAM, which migration tools map read-only."""
        ...

    def options(self) -> dict[str, object]:
        """The creation options (besides kind and name) that recreate this VM after a restart."""
        ...

    def capabilities(self) -> dict[str, object]: ...

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int
    ) -> MemslotChange: ...

    def restore_memslot(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, ram_offset: int
    ) -> MemslotChange: ...

    def get_dirty_log(self, slot: int) -> Harvest: ...

    def overreach(self, slot: int) -> list[tuple[int, int]]:
        """The (slot, page) pairs outside ``slot`` whose dirty state a GET of ``slot`` consumes
        without reporting it to their own slot: s390's inclusive harvest bound
        (:func:`kvmshim.s390.kvm_s390.sync_dirty_log_overreach`); [] where there is no such
        loop. Callers mark these dirty for every consumer of their slot after each GET."""
        ...

    def check_clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> None: ...

    def write(self, gpa: int, data: bytes, path: WritePath) -> np.ndarray: ...

    def write_pages(self, gfns: np.ndarray, value: int, path: WritePath) -> int | None:
        """Store ``value`` (LE u64) into the first 8 bytes of every page in ``gfns``; the
        number of pages these stores newly dirtied (what the next harvest reports because of
        them), or None where the backend cannot attribute dirt to stores (KVM's bitmap)."""
        ...

    def read(self, gpa: int, length: int, path: ReadPath) -> bytes: ...

    def set_storage_key(self, gpa: int, key: int) -> None: ...

    def get_storage_keys(self, start_gfn: int, count: int) -> np.ndarray | None:
        """KVM_S390_GET_SKEYS: the guest's storage key of each frame from ``start_gfn``, one
        uint8 each, without changing any state; None if the guest uses no storage keys
        (KVM_S390_GET_SKEYS_NONE: every key is then the default, 0).

        KvmError EINVAL for a count outside 1..KVM_S390_SKEYS_MAX, EFAULT for a frame in no
        memslot; NotSupportedError on a backend without storage keys (KVM on x86).
        """
        ...

    def saved_storage_keys(self) -> dict[int, bytes]:
        """Per memslot, the guest keys to carry across the daemon's restart: the model's
        (its kernel state lives in the daemon); none for real KVM, whose kernel keeps them."""
        ...

    def restore_storage_keys(self, slot: int, keys: bytes) -> None:
        """Put back what :meth:`saved_storage_keys` gave for ``slot``, dirtying nothing."""
        ...

    def ram_region(self, slot: int) -> RamRegion | None: ...

    def start_workload(self, spec: WorkloadSpec) -> None: ...

    def stop_workload(self) -> None: ...

    def workload_status(self) -> WorkloadStatus | None:
        """The workload started last, or None if none runs."""
        ...

    def vcpu_rates(self) -> list[VcpuRate]:
        """Each vCPU's limit and newly-dirtied/stored rates over the last complete period;
        [] without a workload."""
        ...

    def dirty_ring_snapshot(self) -> RingSnapshot | None:
        """Per-vCPU stored and newly-dirtied page counters since the workload started (copies,
        to difference); None without a workload."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    @property
    def paused(self) -> bool: ...

    def stats(self) -> BackendStats: ...

    def close(self, keep_ram: bool = False) -> None: ...
