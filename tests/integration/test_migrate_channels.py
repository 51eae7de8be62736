"""dirtylogctl migrate over several TCP channels (format version 4) against a real daemon and
a real migrate-receive: verified results, the count negotiated down, hellos that are not the
migration's refused before anything is written, and a lost channel failing the migration."""

import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress

import numpy as np
import pytest

from dirtylogctl.stream import TcpSink
from dirtylogctl.wireformat import (
    CHAN,
    ERR,
    PAGE_SIZE,
    Header,
    SlotInfo,
    done_frame,
    encode_header,
    encode_hello,
    end_frame,
    pages_frame,
)

from .test_migrate import MiB, ctl, migrate, receiver, vm_state


def test_a_running_guest_migrates_over_four_channels_byte_identical(
    daemon, qmp, running_vm, tmp_path
):
    vm = running_vm()  # softmmu: s390 storage keys travel too, on the main channel
    with receiver(tmp_path / "remote.img") as (proc, port):
        out, doc = migrate(daemon, vm, f"tcp:127.0.0.1:{port}", "--verify", "--channels", "4")
        assert out.returncode == 0, out.stderr
        assert proc.wait(30) == 0, proc.stderr.read()
        assert "received" in proc.stdout.read()
    assert doc["channels"] == 4
    assert doc["verify"]["differing-pages"] == 0
    keys = doc["verify"]["storage-keys"]
    assert keys["compared"] is True and keys["differing-keys"] == 0
    assert doc["ram"]["dirty-sync-count"] >= 2 and doc["ram"]["pages-resent"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote.img", "remote.img.skeys"]
    assert vm_state(qmp, vm)["paused"] is True


def test_the_receiver_accepts_no_more_channels_than_its_maximum(daemon, running_vm, tmp_path):
    vm = running_vm()
    with receiver(tmp_path / "remote.img", extra=("--max-channels", "2")) as (proc, port):
        out = ctl(daemon, "migrate", vm, f"tcp:127.0.0.1:{port}", "--verify", "--channels", "4")
        assert out.returncode == 0, out.stderr
        assert proc.wait(30) == 0
    assert "over 2 TCP channels" in out.stdout, out.stdout
    assert "the destination equals the paused source" in out.stdout


def test_a_file_destination_ignores_channels(daemon, running_vm, tmp_path):
    out, doc = migrate(daemon, running_vm(), str(tmp_path / "image"), "--channels", "4")
    assert out.returncode == 0, out.stderr
    assert doc["channels"] == 1


def hello(port, data):
    """Connect, send ``data``, and return every byte answered until the receiver closes."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as peer:
        with suppress(OSError):
            peer.sendall(data)
        with suppress(OSError):
            while chunk := peer.recv(65536):
                answer += chunk
    return answer


def test_hellos_that_are_not_the_migrations_are_refused_and_nothing_of_them_is_written(tmp_path):
    """Before the migration, with the wrong token, an index out of range or taken, and after
    DONE: each peer is answered ERR and dropped; the page its frame names stays as sent."""
    token = bytes(range(16))
    header = Header("x", (SlotInfo(0, 0, 1024),), version=4, channels=3, token=token)
    forged = pages_frame(np.array([0]), np.full(PAGE_SIZE, 0xEE, np.uint8))
    with receiver(tmp_path / "img", extra=("--max-channels", "3")) as (proc, port):
        early = hello(port, encode_hello(token, 1) + forged)
        assert early.startswith(ERR) and b"no migration is waiting" in early
        sink = TcpSink("127.0.0.1", port, offered=3)
        sink.start(header)
        assert sink.channels == 3
        refused = {
            "wrong token": encode_hello(b"\0" * 16, 1),
            "not one of 1..2": encode_hello(token, 3),
            "already connected": encode_hello(token, 2),
        }
        for reason, data in refused.items():
            answer = hello(port, data + forged)
            assert answer.startswith(ERR) and reason.encode() in answer, answer
        pages = np.full((1024, PAGE_SIZE), 0x11, np.uint8)
        gpas = np.arange(1024) * PAGE_SIZE
        sink.send_pages(gpas[:256], pages[:256])  # one frame per channel that owns pages
        sink.send_pages(gpas[256:], pages[256:])
        sink.finish(1024)
        late = hello(port, encode_hello(token, 1) + forged)
        assert late.startswith(ERR) and b"takes no more channels" in late, late
        sink.settle()
        sink.close()
        assert proc.wait(30) == 0, proc.stderr.read()
        dropped = proc.stderr.read()
    assert dropped.count("dropped 127.0.0.1:") == 5, dropped
    image = np.fromfile(tmp_path / "img", np.uint8).reshape(-1, PAGE_SIZE)
    assert (image == 0x11).all()  # not one 0xEE byte of the forged frames


def test_one_channel_is_offered_as_version_3_which_older_receivers_take():
    """A version-3 receiver refuses a version-4 header by its version (the sender then says
    why: test_migrate.py::test_the_sender_is_told_why_the_receiver_refused_the_stream); so
    only a sender offering several channels sends version 4."""
    assert Header.offering("x", (), False, 1).version == 3
    assert Header.offering("x", (), False, 2).version == 4


class ChannelCutter(threading.Thread):
    """Forwards every connection to ``target``; the ``cut``-th (0: the main channel) is shut
    down in both directions once ``after`` bytes of it have passed."""

    def __init__(self, target, cut, after):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.cut, self.after = target, cut, after
        self.cut_done = threading.Event()

    def run(self):
        number = 0
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            limit = self.after if number == self.cut else None
            threading.Thread(target=self.pump, args=(up, conn, None), daemon=True).start()
            threading.Thread(target=self.pump, args=(conn, up, limit), daemon=True).start()
            number += 1

    def pump(self, src, dst, limit):
        seen = 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                seen += len(data)
                if limit is not None and seen >= limit:
                    self.cut_done.set()
                    break
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def test_a_data_channel_lost_mid_stream_fails_the_migration_and_no_image_is_put_in_place(
    daemon, qmp, running_vm, tmp_path
):
    vm = running_vm()
    with receiver(tmp_path / "lost.img") as (proc, port):
        cutter = ChannelCutter(port, cut=1, after=4 * MiB)
        cutter.start()
        out = ctl(
            daemon,
            "migrate",
            vm,
            f"tcp:127.0.0.1:{cutter.port}",
            "--channels",
            "2",
            "--max-bandwidth",
            "40M",
        )
        assert cutter.cut_done.is_set()
        assert out.returncode == 1 and "migration failed" in out.stderr, out.stderr
        assert "channel 1" in out.stderr, out.stderr  # the receiver's reason reached it
        assert proc.wait(30) == 1
        err = proc.stderr.read()
        assert "receive failed: channel 1" in err and err.count("\n") == 1, err
        cutter.server.close()
    assert list(tmp_path.iterdir()) == []  # the staged image is gone, none put in place
    state = vm_state(qmp, vm)
    assert state["paused"] is False
    assert [c["name"] for c in state["consumers"]] == ["default"]


def test_ctrl_c_stops_a_migration_over_channels_and_resumes_the_source(
    daemon, qmp, running_vm, tmp_path
):
    vm = running_vm()
    with receiver(tmp_path / "img") as (proc, port):
        sender = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dirtylogctl.cli",
                "-s",
                daemon.socket,
                "migrate",
                vm,
                f"tcp:127.0.0.1:{port}",
                "--channels",
                "3",
                "--max-bandwidth",
                "10M",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        sent = time.monotonic()
        sender.send_signal(signal.SIGINT)
        _, err = sender.communicate(timeout=30)
        took = time.monotonic() - sent
        assert sender.returncode == 130, err
        assert took < 3, took
        assert proc.wait(30) == 1
    state = vm_state(qmp, vm)
    assert state["paused"] is False
    assert [c["name"] for c in state["consumers"]] == ["default"]
    assert list(tmp_path.iterdir()) == []


LIES = {
    "an END that miscounts": (
        lambda: pages_frame(np.array([BLOCK]), PAGE) + end_frame(2),
        "channel 1: its END says 2 pages were sent, 1 came",
    ),
    "a page of another channel": (
        lambda: pages_frame(np.array([0]), PAGE) + end_frame(1),
        "channel 1: frame 1: the page at 0x0 belongs to channel 0, not 1",
    ),
    "DONE on a data channel": (lambda: done_frame(0), "channel 1: frame 1: DONE on a data channel"),
    "no END before the channel closes": (
        lambda: pages_frame(np.array([BLOCK]), PAGE),
        "channel 1: the channel ended before its END (1 frames came)",
    ),
}
BLOCK = 256 * PAGE_SIZE
PAGE = np.full(PAGE_SIZE, 0x22, np.uint8)


@pytest.mark.parametrize("case", list(LIES))
def test_a_channel_that_lies_fails_the_migration_with_its_reason(tmp_path, case):
    frames, reason = LIES[case]
    token = bytes(16)
    header = Header("x", (SlotInfo(0, 0, 512),), version=4, channels=2, token=token)
    with receiver(tmp_path / "img") as (proc, port):
        main = socket.create_connection(("127.0.0.1", port), timeout=30)
        main.sendall(encode_header(header))
        assert main.recv(8) == CHAN + (2).to_bytes(4, "little")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as channel:
            channel.sendall(encode_hello(token, 1))
            assert channel.recv(8) == CHAN + (1).to_bytes(4, "little")
            channel.sendall(frames())
        with suppress(OSError):
            main.sendall(done_frame(1))
        answer = b""
        with suppress(OSError):
            while chunk := main.recv(65536):
                answer += chunk
        main.close()
        assert answer.startswith(ERR) and answer.endswith(reason.encode()), answer
        assert proc.wait(30) == 1
        assert proc.stderr.read() == f"dirtylogctl: receive failed: {reason}\n"
    assert list(tmp_path.iterdir()) == []
