"""Who is on the other end of a unix socket, and whether they may talk to the daemon.

Both answers come from the socket itself: SO_PEERCRED (pid, uid, gid) and SO_PEERGROUPS (the
supplementary groups), as the kernel recorded them at connect(). Nothing is read from /proc, so
the check works under ProtectProc=invisible and cannot be fooled by a reused pid.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from dataclasses import dataclass

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python's socket
_GID = array.array("I").itemsize


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def __str__(self) -> str:
        return f"uid {self.uid} (gid {self.gid}, pid {self.pid})"


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    return Peer(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    size = 64 * _GID
    while True:  # ERANGE: the peer has more groups than fit; NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536 * _GID:
                size *= 16
                continue
            raise
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % _GID])
        return frozenset(groups)


@dataclass(frozen=True)
class PeerPolicy:
    """Who may connect: root, the daemon's own user, and the allowed uids and gids."""

    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()

    def privileged(self, peer: Peer) -> bool:
        """Root or the daemon's own user: may use the reserved slots, not limited per uid."""
        return peer.uid in (0, os.geteuid())

    def refusal(self, peer: Peer) -> str | None:
        """None if the peer may connect, else the reason it may not."""
        if self.privileged(peer) or peer.uid in self.allow_uids:
            return None
        if self.allow_gids & (peer.groups | {peer.gid}):
            return None
        return f"{peer} is not allowed (--allow-uid/--allow-gid)"
