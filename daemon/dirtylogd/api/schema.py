"""The one declarative table of QMP commands and events: arguments, returns, event data.

Everything about a command's shape comes from here: argument checking (unknown, missing,
wrong-typed or out-of-range arguments are rejected before any handler runs), ``query-commands``,
``query-qmp-schema`` and the protocol reference in docs/protocol.md (both rendered by
:mod:`dirtylogd.api.introspect`). Handlers receive plain Python values under snake_case names;
base64 arguments arrive already decoded. What commands return and events carry is described in
:mod:`dirtylogd.api.replies`; the events are the ones the service emits (a test reads its source).
"""

from __future__ import annotations

from dirtylogd.api import convergence as hc
from dirtylogd.api import handlers as h
from dirtylogd.api import replies as r
from dirtylogd.api.argtypes import (
    U32_MAX,
    U64_MAX,
    Arg,
    Base64,
    Bool,
    Enum,
    Int,
    List,
    Num,
    Object,
    Str,
)
from dirtylogd.api.command import Command, Event
from kvmshim.abi import KVM_S390_SKEYS_MAX
from kvmshim.s390.generations import DEFAULT_KERNEL, KERNELS

# --- shared argument types --------------------------------------------------------------------
NAME = Str(max_len=64, pattern=r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", hint="1-64 of A-Z a-z 0-9 _ . -")
FDNAME = Str(
    max_len=64, pattern=r"[A-Za-z_.-][A-Za-z0-9_.-]{0,63}", hint="a name not starting with a digit"
)
SLOT_ID = Int(0, 0xFFFF)
ADDR = Int(0, U64_MAX)
BACKEND = Enum("Backend", ("auto", "softmmu", "kvm"))
KERNEL = Enum("Kernel", KERNELS)
WRITE_PATH = Enum("WritePath", ("guest", "dma", "kernel"))
READ_PATH = Enum("ReadPath", ("host", "guest"))
ENCODING = Enum("Encoding", ("bitmap", "ranges", "fd"))
KEY_ENCODING = Enum("KeyEncoding", ("base64", "fd"))
PATTERN = Enum("Pattern", ("random", "sequential", "hot-set"))
INT64 = Int(-(1 << 63), (1 << 63) - 1)  # QEMU's int: its own checks give its own errors
CPU_INDEX = Arg("cpu-index", INT64, "the vCPU; every vCPU if omitted", None)

VM = Arg("vm", NAME, "the VM's name")
SLOT = Arg("slot", SLOT_ID, "memslot id (bits 0-15 of KVM's slot field)")
AS_ID = Arg("as-id", SLOT_ID, "address space (bits 16-31 of KVM's slot field)", 0)
CONSUMER = Arg("consumer", NAME, "whose pending bits to read", "default")

MEMSLOT_SPEC = Object(
    "MemslotSpec",
    (
        SLOT,
        AS_ID,
        Arg("guest-phys-addr", ADDR, "guest physical address, page aligned"),
        Arg("size", ADDR, "bytes, a multiple of 4096"),
        Arg("log-dirty-pages", Bool(), "KVM_MEM_LOG_DIRTY_PAGES", True),
    ),
)
IO_RANGE = Object(
    "IoRange",
    (
        Arg("guest-phys-addr", ADDR, "first byte written"),
        Arg("length", Int(1, U64_MAX), "bytes written"),
    ),
)

KVM_ERRORS = ("GenericError with the errno KVM would return (EINVAL, ENOENT, EEXIST, EFAULT)",)
NOT_FOUND = ("DeviceNotFound for an unknown vm",)

COMMANDS: tuple[Command, ...] = (
    Command(
        "qmp_capabilities",
        None,
        "Leave capabilities negotiation. No capabilities are offered.",
        (Arg("enable", List(Str()), "capabilities to enable (none exist)", None),),
        errors=("CommandNotFound once negotiation is complete",),
    ),
    Command(
        "query-version",
        h.query_version,
        "The daemon's version in QEMU's VersionInfo shape, the same as the greeting's: "
        "dirtylogd's own version numbers, not a QEMU version.",
        returns=r.VERSION_INFO,
    ),
    Command(
        "query-commands",
        h.query_commands,
        "Every command this server accepts.",
        returns=List(r.COMMAND_INFO),
    ),
    Command(
        "query-qmp-schema",
        h.query_qmp_schema,
        "Every command and event with its arguments, return and data, in QEMU's "
        "introspection format. Type names are plain (not numbered, as QEMU's are) and match "
        "this reference; like QEMU's they are not part of the protocol.",
        returns=List(r.SCHEMA_INFO),
    ),
    Command(
        "getfd",
        h.getfd,
        "Name the file descriptor sent with this command (SCM_RIGHTS), for "
        "dirty-log-get with encoding 'fd'. A name in use is replaced.",
        (Arg("fdname", FDNAME, "the name to give it"),),
        errors=("GenericError if no descriptor came with the command",),
    ),
    Command(
        "closefd",
        h.closefd,
        "Close a descriptor named by getfd.",
        (Arg("fdname", FDNAME, "its name"),),
        errors=("GenericError if no descriptor has that name",),
    ),
    Command(
        "vm-create",
        h.vm_create,
        "Create a VM with its memslots. 'auto' is 'kvm' on s390x hosts with /dev/kvm, "
        "'softmmu' elsewhere. All or nothing.",
        (
            Arg("name", NAME, "the VM's name"),
            Arg("memslots", List(MEMSLOT_SPEC, max_items=512), "initial memslots", []),
            Arg("backend", BACKEND, "where dirty bits come from", "auto"),
            Arg("esop", Bool(), "softmmu: model an ESOP machine", True),
            Arg(
                "kernel",
                KERNEL,
                f"softmmu: the Linux generation the model follows ('{DEFAULT_KERNEL}' if "
                "omitted: the seed's tree; '3.15': the code the seed removed; '4.19': with "
                "1 MiB pages if asked); refused for kvm, which runs the host's kernel",
                None,
            ),
            Arg(
                "hugepages",
                Bool(),
                "softmmu, kernel '4.19' only: back guest memory with 1 MiB pages "
                "(KVM_CAP_S390_HPAGE_1M); a store to any page reports its whole 1 MiB segment",
                False,
            ),
        ),
        errors=(
            "GenericError if the name is taken, a memslot is refused, 'kernel' is given "
            "for the kvm backend, or 'hugepages' for a generation without 1 MiB pages",
        ),
    ),
    Command(
        "vm-remove",
        h.vm_remove,
        "Stop and remove a VM; its RAM file, record and saved bits go too. Commands already "
        "running on it finish first; later ones get DeviceNotFound. If the record cannot be "
        "removed, the VM stays.",
        (VM,),
        errors=NOT_FOUND,
    ),
    Command(
        "query-vms",
        h.query_vms,
        "Every VM with its backend, capabilities, memslots and consumers; then the VMs whose "
        "saved record could not be restored (status 'ram-lost' or 'unrestorable', with the "
        "reason), on which only vm-remove works.",
        returns=List(r.VM_INFO),
    ),
    Command(
        "memslot-set",
        h.memslot_set,
        "KVM_SET_USER_MEMORY_REGION: create, move, change flags of, or (size 0) delete a slot.",
        (
            VM,
            SLOT,
            AS_ID,
            Arg("guest-phys-addr", ADDR, "guest physical address"),
            Arg("size", ADDR, "bytes; 0 deletes the slot"),
            Arg("log-dirty-pages", Bool(), "KVM_MEM_LOG_DIRTY_PAGES", True),
        ),
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "consumer-add",
        h.consumer_add,
        "Add a consumer: an independent reader of the VM's dirty pages.",
        (
            VM,
            Arg("name", NAME, "the consumer's name"),
            Arg(
                "manual-protect",
                Bool(),
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: get does not clear, dirty-log-clear does",
                False,
            ),
            Arg("initially-set", Bool(), "start with every page dirty", True),
        ),
        errors=(
            *NOT_FOUND,
            "GenericError if the name is taken, or if the VM already has --max-consumers "
            "(default 64) consumers besides 'default'",
        ),
    ),
    Command(
        "consumer-remove",
        h.consumer_remove,
        "Remove a consumer and its pending bits ('default' stays).",
        (VM, Arg("name", NAME, "the consumer's name")),
        errors=(*NOT_FOUND, "DeviceNotFound for an unknown consumer"),
    ),
    Command(
        "dirty-log-get",
        h.dirty_log_get,
        "KVM_GET_DIRTY_LOG for one consumer: harvest the slot for every consumer, answer this "
        "one's pending bits, and (unless manual-protect) clear them. With encoding 'fd' the "
        "bitmap is written at offset 0 of the descriptor named by getfd. Harvests of a VM are "
        "serialised (KVM's slots_lock), so 'generation' orders answers: a simulated store "
        "stamped g is reported in an answer whose generation is g or later. GETs that arrive "
        "while a harvest of their slot runs share the next one, which began after they arrived.",
        (
            VM,
            SLOT,
            AS_ID,
            CONSUMER,
            Arg("encoding", ENCODING, "how the bitmap travels", "bitmap"),
            Arg("fdname", FDNAME, "with encoding 'fd': the descriptor to write to", None),
        ),
        returns=r.DIRTY_LOG_INFO,
        errors=(
            *NOT_FOUND,
            *KVM_ERRORS,
            "GenericError if an inline answer is too large",
            "GenericError, before anything is harvested, if the descriptor cannot take the "
            "bitmap at offset 0 (not a regular file or memfd, not open for writing, O_APPEND, "
            "sealed)",
            "GenericError naming the errno (ENOSPC, EFBIG, ...) if the write falls short: the "
            "pages stay pending for the next get",
        ),
    ),
    Command(
        "dirty-log-clear",
        h.dirty_log_clear,
        "KVM_CLEAR_DIRTY_LOG for one consumer: clear the pages whose bits are set in bitmap "
        "(bit 0 is first-page). first-page is a multiple of 64; num-pages too unless the range "
        "ends at the slot's end.",
        (
            VM,
            SLOT,
            AS_ID,
            Arg("first-page", Int(0, U64_MAX), "first page of the range"),
            Arg("num-pages", Int(0, U32_MAX), "pages in the range"),
            Arg("bitmap", Base64(1 << 29), "ALIGN(num-pages, 64) / 8 bytes, KVM layout"),
            CONSUMER,
        ),
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "io-dirty-mark",
        h.io_dirty_mark,
        "Report pages written by I/O (DMA, kernel mapping): merged into the next harvest of "
        "their slots. All or nothing.",
        (VM, Arg("ranges", List(IO_RANGE, max_items=1 << 16, min_items=1), "written ranges")),
        returns=r.IO_MARK_INFO,
        errors=(*NOT_FOUND, "GenericError (EFAULT) if a range leaves every memslot"),
    ),
    Command(
        "calc-dirty-rate",
        hc.calc_dirty_rate,
        "Measure the VM's dirty rate over calc-time, in the background (QEMU 8.2's "
        "calc-dirty-rate; query-dirty-rate answers). page-sampling: CRC-32 of sample-pages "
        "random pages per GiB of every memslot, read through the RAM file at start and end; "
        "rate = changed share x RAM MiB / seconds, an estimate whose standard error is "
        "rate x sqrt((1 - p) / (p x samples)), p the changed share. dirty-bitmap: a harvest "
        "at start (discarded) and at end by an internal consumer that takes no other "
        "consumer's bits and is never listed or saved; each dirty page counts once. "
        "dirty-ring: the workload vCPUs' newly dirtied pages (softmmu only), per vCPU.",
        (
            VM,
            Arg("calc-time", INT64, "the window, 50 ms to 60 s"),
            Arg("calc-time-unit", r.TIME_UNIT, "calc-time's unit", "second"),
            Arg(
                "sample-pages",
                INT64,
                "page-sampling only: pages sampled per GiB, 128-16384 (default 512)",
                None,
            ),
            Arg("mode", r.MEASURE_MODE, "how to measure (default page-sampling)", None),
        ),
        errors=(
            *NOT_FOUND,
            "GenericError 'the dirty rate is already being measured.'",
            "GenericError 'Calculation time is out of range [50ms, 60000ms].'",
            "GenericError 'sample-pages is used only in page-sampling mode'",
            "GenericError 'sample-pages is out of range[128, 16384].'",
            "GenericError 'mode dirty-ring is not enabled, use other method instead.' on the "
            "kvm backend",
        ),
    ),
    Command(
        "query-dirty-rate",
        h.query_dirty_rate,
        "QEMU's DirtyRateInfo of the last calc-dirty-rate (before any: status 'unstarted', "
        "mode 'page-sampling', times 0), and always beside it the exact rate of the latest "
        "harvests of each slot (harvest-dirty-rate, dirty-pages-rate, calc-time-ms, slots). "
        "Since calc-dirty-rate exists, status, mode and dirty-rate are QEMU's: the harvest "
        "rate is harvest-dirty-rate.",
        (VM, Arg("calc-time-unit", r.TIME_UNIT, "the unit of calc-time in the answer", "second")),
        returns=r.DIRTY_RATE_INFO,
        errors=NOT_FOUND,
    ),
    Command(
        "set-vcpu-dirty-limit",
        hc.set_vcpu_dirty_limit,
        "Limit the rate at which a vCPU (or every vCPU of the running workload) newly dirties "
        "pages (QEMU 7.1). The simulated vCPU sleeps as long as its newly dirtied pages "
        "allow; stores to pages already dirty cost nothing, as in KVM.",
        (
            VM,
            CPU_INDEX,
            Arg(
                "dirty-rate",
                Int(0, 1 << 32),
                "MiB/s (QEMU's MB/s; its uint64, held to 2^32 here so that every limit reads "
                "back exactly); 0 cancels",
            ),
            Arg(
                "until-disconnect",
                Bool(),
                "lift it when this connection closes; until then no other connection may "
                "set or cancel limits",
                False,
            ),
        ),
        errors=(
            *NOT_FOUND,
            "GenericError 'dirty page limit feature requires KVM with accelerator property "
            "'dirty-ring-size' set: ...' on the kvm backend",
            "GenericError 'incorrect cpu index specified (VM ... runs N vCPUs)'",
            "GenericError 'can't set dirty page rate limit while migration is running (...)' "
            "when another connection holds the limits",
        ),
    ),
    Command(
        "cancel-vcpu-dirty-limit",
        hc.cancel_vcpu_dirty_limit,
        "Lift a vCPU's dirty limit (every vCPU's if cpu-index is omitted). Without a dirty "
        "ring it succeeds and does nothing, as QEMU's.",
        (VM, CPU_INDEX),
        errors=(
            *NOT_FOUND,
            "GenericError 'incorrect cpu index specified (...)'",
            "GenericError 'can't cancel dirty page rate limit while migration is running "
            "(...)' when another connection holds the limits",
        ),
    ),
    Command(
        "query-vcpu-dirty-limit",
        hc.query_vcpu_dirty_limit,
        "The limited vCPUs with their limit and the rate they newly dirtied over the last "
        "period; [] when none is limited.",
        (VM,),
        returns=List(r.DIRTY_LIMIT_INFO),
        errors=NOT_FOUND,
    ),
    Command(
        "cpu-throttle-set",
        hc.cpu_throttle_set,
        "Throttle every vCPU: it sleeps this share of the time (QEMU's cpu_throttle_set, "
        "which auto-converge calls inside QEMU; here the migration is another process). "
        "Works on every backend.",
        (
            VM,
            Arg("percentage", Int(0, 99), "share of time asleep; 0 lifts the throttle"),
            Arg(
                "until-disconnect",
                Bool(),
                "lift it when this connection closes; until then no other connection may change it",
                False,
            ),
        ),
        errors=(
            *NOT_FOUND,
            "GenericError 'can't set cpu throttle while migration is running (...)' when "
            "another connection holds it",
        ),
    ),
    Command(
        "vcpu-dirty-limit-period-set",
        hc.vcpu_dirty_limit_period_set,
        "How long each measured current-rate of a vCPU spans, which is also how often a "
        "limit is checked against it (QEMU's x-vcpu-dirty-limit-period).",
        (VM, Arg("period", Int(1, 1000), "ms")),
        errors=(
            *NOT_FOUND,
            "GenericError below 100 ms: the model's vCPUs measure no shorter period",
        ),
    ),
    Command(
        "sim-write",
        h.sim_write,
        "Simulated store of data at an address: 'guest' goes through the MMU (faults, UC); "
        "'dma' and 'kernel' bypass it and reach the I/O log only with report.",
        (
            VM,
            Arg("guest-phys-addr", ADDR, "first byte"),
            Arg("data", Base64(1 << 19), "bytes to store"),
            Arg("path", WRITE_PATH, "who stores", "guest"),
            Arg("report", Bool(), "dma/kernel: report the write to the I/O log", True),
        ),
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "sim-write-pages",
        h.sim_write_pages,
        "Batched store of a little-endian u64 into the first 8 bytes of each page. On "
        "softmmu bytes 8-15 get the VM's store sequence number, so every store changes its "
        "page, as a real guest's data would (page-sampling sees it).",
        (
            VM,
            Arg("gfns", List(Int(0, (1 << 52) - 1), max_items=1 << 17), "guest frame numbers"),
            Arg("value", Int(0, U64_MAX), "the stamp"),
            Arg("path", WRITE_PATH, "who stores", "guest"),
            Arg("report", Bool(), "dma/kernel: report the write to the I/O log", True),
        ),
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "sim-read",
        h.sim_read,
        "Read guest memory: 'host' as a migration tool reads (no MMU effect), 'guest' as a "
        "guest load through the MMU (s390 model only).",
        (
            VM,
            Arg("guest-phys-addr", ADDR, "first byte"),
            Arg("length", Int(0, 1 << 20), "bytes"),
            Arg("path", READ_PATH, "who reads", "host"),
        ),
        returns=r.SIM_READ_INFO,
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "sim-set-storage-key",
        h.sim_set_storage_key,
        "Guest SSKE on the page holding an address (s390 model only).",
        (
            VM,
            Arg("guest-phys-addr", ADDR, "an address in the page"),
            Arg(
                "key",
                Int(0, 255),
                "the storage key byte: ACC (bits 4-7), F (3), R (2), C (1); bit 0 is "
                "reserved and ignored, as SSKE ignores it",
            ),
        ),
        errors=(*NOT_FOUND, *KVM_ERRORS),
    ),
    Command(
        "storage-keys-get",
        h.storage_keys_get,
        "KVM_S390_GET_SKEYS: the guest's storage key of each frame from start-gfn, one byte "
        "each, as 4.19's get_guest_storage_key sees it (a valid page's real key, else the "
        "guest's ACC/F; the guest's R/C ORed in). Reading changes nothing: no page becomes "
        "dirty. With encoding 'fd' the keys are written at offset 0 of the descriptor named "
        "by getfd. The range may span adjacent memslots, as the ioctl's may.",
        (
            VM,
            Arg("start-gfn", Int(0, (1 << 52) - 1), "first guest frame (guest address / 4096)"),
            Arg(
                "count",
                Int(1, KVM_S390_SKEYS_MAX),
                f"frames, at most KVM_S390_SKEYS_MAX ({KVM_S390_SKEYS_MAX}: 4 GiB of guest)",
            ),
            Arg("encoding", KEY_ENCODING, "how the keys travel", "base64"),
            Arg("fdname", FDNAME, "with encoding 'fd': the descriptor to write to", None),
        ),
        returns=r.STORAGE_KEYS_INFO,
        errors=(
            *NOT_FOUND,
            "GenericError (EFAULT) if a frame is in no memslot; nothing is read",
            "GenericError 'this backend has no storage keys' on the kvm backend of a host "
            "other than s390x",
            "GenericError if the base64 answer would not fit an inline reply (use 'fd'), or "
            "if the descriptor cannot take the keys at offset 0 (as for dirty-log-get)",
        ),
    ),
    Command(
        "sim-workload-start",
        h.sim_workload_start,
        "Start simulated vCPUs storing generation stamps (replaces a running workload).",
        (
            VM,
            Arg("pages-per-second", Int(1, 100_000_000), "target store rate, all vCPUs"),
            Arg("vcpus", Int(1, 64), "vCPU threads", 1),
            Arg("pattern", PATTERN, "which pages", "random"),
            Arg("seed", Int(0, U64_MAX), "random seed", None),
            Arg("dma-share", Num(0.0, 1.0), "share of stores made by a device", 0.0),
            Arg("dma-report", Bool(), "whether those device writes are reported", True),
        ),
        errors=NOT_FOUND,
    ),
    Command(
        "sim-workload-stop",
        h.sim_workload_stop,
        "Stop the simulated vCPUs.",
        (VM,),
        errors=NOT_FOUND,
    ),
    Command(
        "stop",
        h.stop,
        "Pause the VM's vCPUs; returns once none is storing.",
        (VM,),
        errors=NOT_FOUND,
    ),
    Command("cont", h.cont, "Resume the VM's vCPUs.", (VM,), errors=NOT_FOUND),
)

BY_NAME: dict[str, Command] = {c.name: c for c in COMMANDS}

EVENTS: tuple[Event, ...] = (
    Event(
        "STOP",
        "stop paused the VM's vCPUs: none is storing any more.",
        (r.EVENT_VM,),
    ),
    Event("RESUME", "cont resumed the VM's vCPUs.", (r.EVENT_VM,)),
    Event(
        "VCPU_FAILED",
        "A vCPU thread of the VM's workload died (on the kvm backend: a guest that crashed); "
        "query-vms shows why in workload.failed.",
        (
            r.EVENT_VM,
            Arg("vcpu", Int(0, 63), "the vCPU's index"),
            Arg("error", Str(), "why it stopped"),
        ),
    ),
)
