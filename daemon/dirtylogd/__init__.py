"""dirtylogd: a QMP service that gives live-migration tools the dirty pages of VMs.

Layers, bottom up: framing (pure) → session (greeting, negotiation, ids) → schema-checked
command table → service (VMs, consumers, I/O log) → kvmshim backends. ``server`` only wires
sockets to sessions.
"""

__version__ = "0.1.0"
VERSION = tuple(int(p) for p in __version__.split("."))

__all__ = ["VERSION", "__version__"]
