"""The service: the VM registry, each VM's consumers and I/O log, the state store, telemetry.

It speaks Python, not QMP: the vocabulary (:mod:`dirtylogd.api`) calls it, and it drives the
kvmshim backends. Blocking work runs in worker threads.
"""
