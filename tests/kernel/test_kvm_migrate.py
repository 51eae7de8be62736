"""Migrating a running guest on real KVM: the guest program stores while pre-copy runs; x86
has no storage keys, so none travel and --verify says they were not compared."""

import json
import subprocess
import sys
import time

MiB = 1 << 20


def test_running_kvm_guest_migrates_byte_identical(kvm_daemon, kqmp, tmp_path):
    kqmp(
        "vm-create",
        name="kmig",
        backend="kvm",
        memslots=[
            {"slot": 0, "guest-phys-addr": 4 << 30, "size": 48 * MiB},
            {"slot": 1, "guest-phys-addr": 8 << 30, "size": 16 * MiB},
        ],
    )
    try:
        kqmp("sim-workload-start", vm="kmig", pages_per_second=20_000, vcpus=2, seed=3)
        time.sleep(0.3)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "dirtylogctl.cli",
                "-s",
                kvm_daemon.socket,
                "--json",
                "migrate",
                "kmig",
                str(tmp_path / "image"),
                "--verify",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["status"] == "completed" and doc["verify"]["differing-pages"] == 0
        assert doc["ram"]["dirty-sync-count"] >= 2 and doc["ram"]["pages-resent"] > 0
        # x86 has no storage keys: none sent, none compared, and both say why
        why = "the kvm backend on x86_64 has no storage keys (KVM_CAP_S390_SKEYS is 0)"
        assert doc["storage-keys"]["sent"] is False
        assert doc["storage-keys"]["not-sent-because"] == why
        assert doc["verify"]["storage-keys"] == {"compared": False, "why": why}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]  # no image.skeys
        vm = next(v for v in kqmp("query-vms") if v["name"] == "kmig")
        assert vm["paused"] is True and vm["workload"]["pages-stored"] > 0
    finally:
        kqmp("vm-remove", vm="kmig")


def test_running_kvm_guest_migrates_over_two_channels_without_keys(kvm_daemon, kqmp, tmp_path):
    """No storage keys (x86): the main channel carries pages, DONE and VERIFY only."""
    from tests.integration.test_migrate import receiver

    kqmp(
        "vm-create",
        name="kmig2",
        backend="kvm",
        memslots=[{"slot": 0, "guest-phys-addr": 4 << 30, "size": 48 * MiB}],
    )
    try:
        kqmp("sim-workload-start", vm="kmig2", pages_per_second=20_000, vcpus=2, seed=3)
        time.sleep(0.3)
        with receiver(tmp_path / "image") as (proc, port):
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dirtylogctl.cli",
                    "-s",
                    kvm_daemon.socket,
                    "--json",
                    "migrate",
                    "kmig2",
                    f"tcp:127.0.0.1:{port}",
                    "--verify",
                    "--channels",
                    "2",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert out.returncode == 0, out.stderr
            assert proc.wait(30) == 0
        doc = json.loads(out.stdout)
        assert doc["channels"] == 2 and doc["verify"]["differing-pages"] == 0
        assert doc["storage-keys"]["sent"] is False
        assert sorted(p.name for p in tmp_path.iterdir()) == ["image"]
    finally:
        kqmp("vm-remove", vm="kmig2")


CTL = [sys.executable, "-m", "dirtylogctl.cli"]


def _kvm_migrate(kvm_daemon, image, *extra):
    return subprocess.run(
        [*CTL, "-s", kvm_daemon.socket, "--json", "migrate", "kconv", str(image), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_kvm_guest_auto_converges_and_dirty_limit_is_refused(kvm_daemon, kqmp, tmp_path):
    """The cpu throttle needs no ring: the daemon's vCPU threads sleep between KVM_RUN calls.
    The dirty limit needs one (QEMU's rule), and this backend reads KVM's bitmap."""
    kqmp(
        "vm-create",
        name="kconv",
        backend="kvm",
        memslots=[{"slot": 0, "guest-phys-addr": 4 << 30, "size": 64 * MiB}],
    )
    try:
        kqmp("sim-workload-start", vm="kconv", pages_per_second=50_000, vcpus=2, seed=3)
        time.sleep(0.3)
        out = _kvm_migrate(kvm_daemon, tmp_path / "refused", "--dirty-limit", "1")
        assert out.returncode == 3, out.stderr
        assert "dirty-limit requires KVM with accelerator property 'dirty-ring-size'" in out.stderr
        assert not (tmp_path / "refused").exists()
        out = _kvm_migrate(
            kvm_daemon,
            tmp_path / "image",
            "--verify",
            "--resume",
            "--auto-converge",
            "--cpu-throttle-initial",
            "99",
            "--max-bandwidth",
            "100M",
            "--max-rounds",
            "12",
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["converged"] is True and doc["verify"]["differing-pages"] == 0
        assert doc["convergence"]["cpu-throttle-steps"] == [99]
        vm = next(v for v in kqmp("query-vms") if v["name"] == "kconv")
        assert vm["cpu-throttle-percentage"] == 0
    finally:
        kqmp("vm-remove", vm="kconv")
