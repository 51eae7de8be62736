"""The wire: QMP framing (pure), the session that owns every envelope, the unix socket, peers.

Nothing here knows what a VM is: commands arrive as a table injected by whoever starts the
server (:mod:`dirtylogd.__main__`), and events through :class:`dirtylogd.qmp.events.EventHub`.
"""
