"""What the daemon sends: the shape of each command's return and each event's data.

The command table (:mod:`dirtylogd.api.schema`) names these; ``query-qmp-schema`` and
docs/protocol.md render them, and the integration tests hold every live reply and event to them,
member by member. A member that may be absent is declared with a default of ``None`` (QEMU's
``'*name'``); its doc says when it is there. Types are named as QEMU names its own where one
exists (VersionInfo, CommandInfo, SchemaInfo, DirtyRateInfo).
"""

from __future__ import annotations

import math

from dirtylogd.api.argtypes import (
    Alternate,
    Arg,
    ArgType,
    Base64,
    Bool,
    Enum,
    Int,
    List,
    Null,
    Num,
    Object,
    Str,
    Union,
)

STR_OR_NULL = Alternate("StrOrNull", (Str(), Null()))
SLOT_ID = Int(0, 0xFFFF)
NON_NEGATIVE = Num(0.0, math.inf)

# --- query-version, query-commands ------------------------------------------------------------
VERSION_TRIPLE = Object(
    "VersionTriple",
    (
        Arg("major", Int(), "X of dirtylogd X.Y.Z"),
        Arg("minor", Int(), "Y of dirtylogd X.Y.Z"),
        Arg("micro", Int(), "Z of dirtylogd X.Y.Z"),
    ),
)
VERSION_INFO = Object(
    "VersionInfo",
    (
        Arg(
            "qemu",
            VERSION_TRIPLE,
            "dirtylogd's own version numbers, not a QEMU version: the member keeps QEMU's name "
            "because QMP clients (qmp-shell) read it from the greeting",
        ),
        Arg("package", Str(), '"dirtylogd X.Y.Z"'),
    ),
)
COMMAND_INFO = Object("CommandInfo", (Arg("name", Str(), "the command's name"),))

# --- query-qmp-schema: QEMU's qapi/introspect.json, as far as this daemon uses it ------------
META_TYPE = Enum(
    "SchemaMetaType", ("builtin", "enum", "array", "object", "alternate", "command", "event")
)
JSON_TYPE = Enum(
    "JSONType", ("string", "number", "int", "boolean", "null", "object", "array", "value")
)
SCHEMA_INFO = Union(
    "SchemaInfo",
    (
        Arg(
            "name",
            Str(),
            "a command's or event's name, or a type's (which is not part of the protocol)",
        ),
        Arg("meta-type", META_TYPE, "what kind of entity this is"),
    ),
    "meta-type",
    (
        ("builtin", Object("SchemaInfoBuiltin", (Arg("json-type", JSON_TYPE, "on the wire"),))),
        (
            "enum",
            Object(
                "SchemaInfoEnum",
                (
                    Arg(
                        "members",
                        List(Object("SchemaInfoEnumMember", (Arg("name", Str(), "a value"),))),
                        "the values",
                    ),
                    Arg("values", List(Str()), "the values again, where older QEMU clients look"),
                ),
            ),
        ),
        ("array", Object("SchemaInfoArray", (Arg("element-type", Str(), "a type's name"),))),
        (
            "object",
            Object(
                "SchemaInfoObject",
                (
                    Arg(
                        "members",
                        List(
                            Object(
                                "SchemaInfoObjectMember",
                                (
                                    Arg("name", Str(), "the member's name"),
                                    Arg("type", Str(), "its type's name"),
                                    Arg(
                                        "default",
                                        ArgType(),
                                        "always null; present if the member may be absent",
                                        None,
                                    ),
                                ),
                            )
                        ),
                        "the members every value has (or may have)",
                    ),
                    Arg("tag", Str(), "a union's: the member whose value picks a variant", None),
                    Arg(
                        "variants",
                        List(
                            Object(
                                "SchemaInfoObjectVariant",
                                (
                                    Arg("case", Str(), "a value of the tag"),
                                    Arg("type", Str(), "the object type adding its members"),
                                ),
                            )
                        ),
                        "a union's, with tag",
                        None,
                    ),
                ),
            ),
        ),
        (
            "alternate",
            Object(
                "SchemaInfoAlternate",
                (
                    Arg(
                        "members",
                        List(Object("SchemaInfoAlternateMember", (Arg("type", Str(), "a type"),))),
                        "the types a value may have, told apart by their JSON type",
                    ),
                ),
            ),
        ),
        (
            "command",
            Object(
                "SchemaInfoCommand",
                (
                    Arg("arg-type", Str(), "the object type of its arguments"),
                    Arg("ret-type", Str(), "the type of its return"),
                    Arg("allow-oob", Bool(), "always false: no out-of-band execution"),
                ),
            ),
        ),
        ("event", Object("SchemaInfoEvent", (Arg("arg-type", Str(), "the type of its data"),))),
    ),
)

# --- query-vms ---------------------------------------------------------------------------------
MEMSLOT_INFO = Object(
    "MemslotInfo",
    (
        Arg("slot", SLOT_ID, "memslot id (bits 0-15 of KVM's slot field)"),
        Arg("as-id", SLOT_ID, "address space (bits 16-31 of KVM's slot field)"),
        Arg("guest-phys-addr", Int(), "guest physical address"),
        Arg("size", Int(), "bytes"),
        Arg("npages", Int(), "pages of 4096 bytes: bits in the slot's dirty bitmap"),
        Arg("log-dirty-pages", Bool(), "KVM_MEM_LOG_DIRTY_PAGES"),
        Arg(
            "ram-offset",
            Int(),
            "where the slot's RAM starts in the file at ram-path; absent only while the slot "
            "is being deleted",
            None,
        ),
    ),
)
CONSUMER_INFO = Object(
    "ConsumerInfo",
    (
        Arg("name", Str(), "the consumer's name"),
        Arg("manual-protect", Bool(), "get does not clear, dirty-log-clear does"),
        Arg("initially-set", Bool(), "it started with every page dirty"),
        Arg("pending-pages", Int(), "dirty pages waiting for its next get, every slot"),
    ),
)
WORKLOAD_INFO = Object(
    "WorkloadInfo",
    (
        Arg("running", Bool(), "true while a vCPU thread lives, paused or not"),
        Arg("pages-stored", Int(), "stores so far"),
        Arg("pages-per-second", Int(), "the target rate asked for, all vCPUs"),
        Arg("vcpus", Int(1, 64), "vCPU threads"),
        Arg("failed", STR_OR_NULL, "why a vCPU died (also sent as VCPU_FAILED), or null"),
    ),
)
BACKEND_CAPABILITIES = Object(
    "BackendCapabilities",
    (
        Arg("nr-memslots", Int(), "KVM_CAP_NR_MEMSLOTS: memslots per address space"),
        Arg("s390-cow", Int(), "KVM_CAP_S390_COW (MACHINE_HAS_ESOP on s390)"),
        Arg("manual-dirty-log-protect2", Int(), "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
        Arg("dirty-log-ring", Int(), "KVM_CAP_DIRTY_LOG_RING"),
        Arg(
            "vcpu-dirty-ring",
            Bool(),
            "the daemon attributes each newly dirtied page to the vCPU that stored it (softmmu: "
            "true; kvm: false, it reads KVM's bitmap): set-vcpu-dirty-limit and calc-dirty-rate "
            "mode dirty-ring need it",
        ),
        Arg(
            "s390-skeys",
            Int(),
            "KVM_CAP_S390_SKEYS: storage-keys-get reads the guest's storage keys (softmmu: 1; "
            "kvm: the host's answer, 0 on x86)",
        ),
        Arg("esop", Bool(), "softmmu only: the model is an ESOP machine", None),
        Arg("kernel", Str(), "softmmu only: the Linux generation the model follows", None),
        Arg("hugepages", Bool(), "softmmu only: guest memory on 1 MiB pages", None),
        Arg(
            "s390-hpage-1m",
            Int(),
            "softmmu only: KVM_CAP_S390_HPAGE_1M (1 from kernel 4.19)",
            None,
        ),
        Arg("multi-address-space", Int(), "kvm only: KVM_CAP_MULTI_ADDRESS_SPACE", None),
        Arg("nr-vcpus", Int(), "kvm only: KVM_CAP_NR_VCPUS", None),
        Arg("arch", Str(), "kvm only: the host's machine (uname -m)", None),
        Arg("manual-protect", Bool(), "kvm only: the VM runs with manual protect", None),
        Arg("initially-set", Bool(), "kvm only: ... and KVM_DIRTY_LOG_INITIALLY_SET", None),
        Arg(
            "guest-program",
            STR_OR_NULL,
            "kvm only: the guest code the vCPUs run, or null where there is none",
            None,
        ),
    ),
)
VM_UNAVAILABLE = Object(
    "VmInfoUnavailable",
    (
        Arg("reason", Str(), "why it is not served"),
        Arg("record", Str(), "the saved record's path, kept until vm-remove"),
    ),
)
VM_INFO = Union(
    "VmInfo",
    (
        Arg("name", Str(), "the VM's name"),
        Arg(
            "status",
            Enum("VmStatus", ("ok", "ram-lost", "unrestorable")),
            "'ok': served; 'ram-lost': its saved record's RAM file is gone (a reboot); "
            "'unrestorable': its record could not be restored otherwise",
        ),
    ),
    "status",
    (
        (
            "ok",
            Object(
                "VmInfoServed",
                (
                    Arg("backend", Enum("BackendKind", ("softmmu", "kvm")), "its backend"),
                    Arg("capabilities", BACKEND_CAPABILITIES, "what its backend offers"),
                    Arg(
                        "kernel",
                        Str(),
                        "softmmu only: the Linux generation the model follows",
                        None,
                    ),
                    Arg(
                        "hugepages",
                        Bool(),
                        "softmmu only: guest memory on 1 MiB pages (kernel 4.19)",
                        None,
                    ),
                    Arg("paused", Bool(), "stopped by stop"),
                    Arg("generation", Int(), "the stamp the next simulated store carries"),
                    Arg("memslots", List(MEMSLOT_INFO), "by address space, then slot id"),
                    Arg("consumers", List(CONSUMER_INFO), "every consumer, 'default' too"),
                    Arg("ram-path", Str(), "the guest RAM file, to map read-only"),
                    Arg(
                        "workload",
                        WORKLOAD_INFO,
                        "from sim-workload-start until sim-workload-stop",
                        None,
                    ),
                    Arg(
                        "cpu-throttle-percentage",
                        Int(0, 99),
                        "cpu-throttle-set's: share of time every vCPU sleeps (0: none)",
                    ),
                    Arg(
                        "vcpu-dirty-limit-period",
                        Int(),
                        "ms each current-rate of a vCPU spans (vcpu-dirty-limit-period-set)",
                    ),
                ),
            ),
        ),
        ("ram-lost", VM_UNAVAILABLE),
        ("unrestorable", VM_UNAVAILABLE),
    ),
)

# --- dirty logs, rates, simulation -------------------------------------------------------------
DIRTY_LOG_INFO = Object(
    "DirtyLogInfo",
    (
        Arg("npages", Int(), "pages in the slot"),
        Arg("dirty-pages", Int(), "pages reported dirty in this answer"),
        Arg("generation", Int(), "orders answers: a store stamped g is in one of generation >= g"),
        Arg("bitmap", Base64(), "with encoding 'bitmap': KVM's layout, base64", None),
        Arg(
            "ranges",
            List(List(Int())),
            "with encoding 'ranges': [first page, count] of each run of dirty pages",
            None,
        ),
    ),
)
IO_MARK_INFO = Object(
    "IoMarkInfo",
    (
        Arg(
            "pages",
            Int(),
            "pages recorded in the I/O logs of slots that log dirty pages (a page two ranges "
            "name counts twice)",
        ),
    ),
)
TIME_UNIT = Enum("TimeUnit", ("second", "millisecond"))
MEASURE_MODE = Enum("DirtyRateMeasureMode", ("page-sampling", "dirty-ring", "dirty-bitmap"))
DIRTY_RATE_VCPU = Object(
    "DirtyRateVcpu",
    (
        Arg("id", Int(), "the vCPU's index"),
        Arg("dirty-rate", Int(), "MiB/s it newly dirtied"),
    ),
)
DIRTY_RATE_INFO = Object(
    "DirtyRateInfo",
    (
        Arg(
            "status",
            Enum("DirtyRateStatus", ("unstarted", "measuring", "measured")),
            "of the last calc-dirty-rate: 'unstarted' before any",
        ),
        Arg(
            "mode",
            MEASURE_MODE,
            "of the last calc ('page-sampling' before any, as QEMU)",
        ),
        Arg("start-time", Int(), "when the last calc began, seconds of the monotonic clock"),
        Arg(
            "calc-time",
            Int(),
            "the window asked for while measuring, then the one measured, floored to "
            "calc-time-unit; 0 before any calc",
        ),
        Arg("calc-time-unit", TIME_UNIT, "as queried"),
        Arg("sample-pages", Int(), "page-sampling: pages per GiB; 0 in the other modes"),
        Arg("dirty-rate", Int(), "MiB/s, only once measured (-1: nothing could be sampled)", None),
        Arg(
            "vcpu-dirty-rate",
            List(DIRTY_RATE_VCPU),
            "dirty-ring mode, once measured: each vCPU's rate (dirty-rate is their sum)",
            None,
        ),
        Arg("sample-count", Int(), "page-sampling, once measured: pages sampled", None),
        Arg(
            "dirty-samples",
            Int(),
            "page-sampling, once measured: sampled pages that changed (the estimate's "
            "standard error is dirty-rate * sqrt((1 - p) / (p * sample-count)), p = "
            "dirty-samples / sample-count)",
            None,
        ),
        Arg(
            "harvest-dirty-rate",
            Int(),
            "MiB/s from the latest harvests of every slot, exact (what dirty-rate meant before "
            "calc-dirty-rate existed)",
        ),
        Arg("dirty-pages-rate", NON_NEGATIVE, "pages/s from the latest harvests, all slots"),
        Arg("calc-time-ms", NON_NEGATIVE, "the longest harvest interval of those slots"),
        Arg(
            "slots",
            List(
                Object(
                    "DirtyRateSlot",
                    (
                        Arg("slot", SLOT_ID, "memslot id"),
                        Arg("as-id", SLOT_ID, "address space"),
                        Arg("dirty-pages", Int(), "dirty pages of its latest harvest"),
                        Arg("interval-ms", NON_NEGATIVE, "since the harvest before"),
                        Arg("pages-per-second", NON_NEGATIVE, "dirty-pages / interval"),
                    ),
                )
            ),
            "each slot harvested so far, by address space, then slot id",
        ),
    ),
)
DIRTY_LIMIT_INFO = Object(
    "DirtyLimitInfo",
    (
        Arg("cpu-index", Int(), "the vCPU's index"),
        Arg("limit-rate", Int(), "its limit, MiB/s"),
        Arg("current-rate", Int(), "MiB/s it newly dirtied over the last period"),
    ),
)
SIM_READ_INFO = Object("SimReadInfo", (Arg("data", Base64(), "the bytes read"),))
STORAGE_KEYS_INFO = Object(
    "StorageKeysInfo",
    (
        Arg("start-gfn", Int(), "the first frame, as asked"),
        Arg("count", Int(), "frames, as asked"),
        Arg(
            "uses-keys",
            Bool(),
            "false if the guest never used a storage-key instruction "
            "(KVM_S390_GET_SKEYS_NONE): every key is then 0 and none is returned or written",
        ),
        Arg(
            "keys",
            Base64(),
            "with encoding 'base64' and uses-keys: one key byte per frame, in frame order",
            None,
        ),
    ),
)

# --- events --------------------------------------------------------------------------------------
EVENT_VM = Arg("vm", Str(), "the VM's name")
