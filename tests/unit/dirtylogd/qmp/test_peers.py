"""Peer credentials from the socket itself, and the policy that reads them."""

import os
import socket

from dirtylogd.qmp.peers import Peer, PeerPolicy, peer_of


def test_peer_of_a_socketpair_is_this_process_with_its_groups():
    a, b = socket.socketpair()
    with a, b:
        peer = peer_of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups == frozenset(os.getgroups())


def stranger(gid: int = 500, groups: frozenset[int] = frozenset()) -> Peer:
    return Peer(pid=1234, uid=os.geteuid() + 777, gid=gid, groups=groups)


def test_policy_admits_root_itself_allowed_uids_and_allowed_groups():
    assert PeerPolicy().refusal(Peer(1, 0, 0, frozenset())) is None
    assert PeerPolicy().refusal(Peer(1, os.geteuid(), 9, frozenset())) is None
    s = stranger()
    assert PeerPolicy(allow_uids=frozenset({s.uid})).refusal(s) is None
    assert PeerPolicy(allow_gids=frozenset({500})).refusal(stranger(gid=500)) is None
    assert PeerPolicy(allow_gids=frozenset({7})).refusal(stranger(groups=frozenset({3, 7}))) is None


def test_policy_refuses_everyone_else_with_who_they_are():
    s = stranger(groups=frozenset({3}))
    reason = PeerPolicy(allow_gids=frozenset({7})).refusal(s)
    assert reason == f"uid {s.uid} (gid 500, pid 1234) is not allowed (--allow-uid/--allow-gid)"


def test_only_root_and_the_daemons_own_user_are_privileged():
    """They alone may take the reserved slots; an allowed user is admitted, not privileged."""
    policy = PeerPolicy(allow_uids=frozenset({stranger().uid}))
    assert policy.privileged(Peer(1, 0, 0, frozenset()))
    assert policy.privileged(Peer(1, os.geteuid(), 0, frozenset()))
    assert not policy.privileged(stranger())
