"""What `pip install dirtylogd` gives a user works: every module, both commands, the kvm backend.

Each check runs the venv's programs (see conftest), never the checkout, so a package or a
dependency that packaging forgets fails here by name.
"""

import json
import os
import re
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import need, need_tool
from tests.deployment.conftest import REPO, source_packages

pytestmark = pytest.mark.deployment

MiB = 1 << 20


def source_modules() -> list[str]:
    """Dotted names of every module of the source tree, packages included."""
    names = []
    for folder in source_packages().values():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(folder.parent).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


def source_files() -> set[str]:
    """Paths, as a wheel names them, of the source tree's modules and py.typed markers."""
    files = set()
    for folder in source_packages().values():
        for path in folder.rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix == ".py" or path.name == "py.typed":
                files.add(path.relative_to(folder.parent).as_posix())
    return files


# Runs in the venv: imports each module named in argv (a __main__ only located, as running it
# would start the program) and prints one JSON report; stdout is kept for the report alone.
IMPORT_ALL = """
import importlib, importlib.util, json, sys, traceback
report, sys.stdout = sys.stdout, sys.stderr
modules = {}
for name in sys.argv[1:]:
    try:
        if name.rpartition(".")[2] == "__main__":
            spec = importlib.util.find_spec(name)
            modules[name] = {"file": spec and spec.origin, "error": None if spec else "not found"}
        else:
            modules[name] = {"file": importlib.import_module(name).__file__, "error": None}
    except BaseException as exc:
        modules[name] = {"file": None, "error": "".join(traceback.format_exception_only(exc))}
json.dump(modules, report)
"""


def test_every_source_module_imports_from_the_wheel(installed_wheel):
    names = source_modules()
    assert "kvmshim.x86.guest" in names and "dirtylogd.__main__" in names, names
    proc = installed_wheel.run("python", "-c", IMPORT_ALL, *names, timeout=120)
    report = json.loads(proc.stdout)
    failed = {name: r["error"].strip() for name, r in report.items() if r["error"]}
    assert not failed, "modules that do not import from the installed wheel:\n" + "\n".join(
        f"  {name}: {error}" for name, error in sorted(failed.items())
    )
    outside = {name: r["file"] for name, r in report.items() if not installed_wheel.owns(r["file"])}
    assert not outside, f"imported from outside the venv {installed_wheel.venv}: {outside}"


def test_wheel_ships_every_source_file(built_wheel):
    with zipfile.ZipFile(built_wheel) as wheel:
        shipped = {n for n in wheel.namelist() if n.endswith(".py") or n.endswith("/py.typed")}
    expected = source_files()
    missing = expected - shipped
    forgotten = sorted(
        f.removesuffix("/__init__.py").replace("/", ".")
        for f in missing
        if f.endswith("/__init__.py")
    )
    assert not missing, f"{built_wheel.name} lacks packages {forgotten} and files {sorted(missing)}"
    stale = shipped - expected
    assert not stale, f"{built_wheel.name} ships files the source tree does not have: {stale}"


def test_commands_run_without_extras(installed_wheel):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [re.match(r"[\w.-]+", req).group() for req in project["optional-dependencies"]["test"]]
    present = installed_wheel.run(
        "python",
        "-c",
        "import importlib.metadata as m, sys\n"
        "for d in sys.argv[1:]:\n"
        "    try: print(m.distribution(d).name)\n"
        "    except m.PackageNotFoundError: pass",
        *extras,
    ).stdout.split()
    assert not present, f"the venv has the test extra's {present}: not what a user gets"

    for command in ("dirtylogd", "dirtylogctl", "dirtylogd-install-units"):
        out = installed_wheel.run(command, "--help").stdout
        assert out.startswith(f"usage: {command}"), out
    # The version comes from the installed metadata; a checkout never installed says 0+unknown.
    out = installed_wheel.run("dirtylogd", "--version").stdout
    assert project["version"] in out, f"dirtylogd --version says {out!r}"


def test_the_wheel_installs_its_units_pointing_into_its_venv(installed_wheel, tmp_path):
    """The systemd templates ship as data files; installed from the venv, ExecStart= runs it."""
    out = installed_wheel.run("dirtylogd-install-units", "--root", tmp_path).stdout
    assert "next: systemctl enable --now dirtylogd.socket" in out, out
    units = tmp_path / "etc" / "systemd" / "system"
    assert sorted(p.name for p in units.iterdir()) == [
        "dirtylogd.service",
        "dirtylogd.socket",
        "run-dirtylogd-ram.mount",
    ]
    (execstart,) = [
        line.split()[0]
        for line in (units / "dirtylogd.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    assert execstart == f"ExecStart={installed_wheel.bin('dirtylogd')}"
    assert (tmp_path / "etc" / "sysusers.d" / "dirtylogd.conf").read_text().count("dirtylogd") > 1


def shipped_data_files() -> dict[str, Path]:
    """Where under the venv each generated or example file belongs: its repository copy."""
    files = {f"share/man/man{p.suffix[1:]}/{p.name}": p for p in (REPO / "docs/man").iterdir()}
    for shell, folder in [("bash", "bash-completion/completions"), ("zsh", "zsh/site-functions")]:
        files |= {f"share/{folder}/{p.name}": p for p in (REPO / "completions" / shell).iterdir()}
    files["share/doc/dirtylogd/dirtylogd.toml"] = REPO / "docs" / "dirtylogd.toml"
    return files


def test_the_wheel_installs_man_pages_completion_and_the_example_config(installed_wheel):
    files = shipped_data_files()
    assert {
        "share/man/man8/dirtylogd.8",
        "share/man/man1/dirtylogctl.1",
        "share/bash-completion/completions/dirtylogctl",
        "share/zsh/site-functions/_dirtylogd",
    } <= set(files)
    for name, source in files.items():
        installed = installed_wheel.venv / name
        assert installed.is_file(), f"the wheel did not install {name}"
        assert installed.read_bytes() == source.read_bytes(), f"{name} differs from {source}"
    (license_,) = installed_wheel.venv.glob(
        "lib/python*/site-packages/dirtylogd-*.dist-info/licenses/LICENSE"
    )
    assert license_.read_bytes() == (REPO / "LICENSE").read_bytes()


def test_man_finds_the_pages_of_a_venv_on_path(installed_wheel):
    """man-db looks in ../share/man of every $PATH entry: the README's promise for a venv."""
    need_tool("man")
    env = {k: v for k, v in installed_wheel.env.items() if k not in ("MANPATH", "MANPAGER")}
    for page, section in [("dirtylogctl", "1"), ("dirtylogd", "8")]:
        done = subprocess.run(
            ["man", "-w", page],
            env=env,
            cwd=installed_wheel.workdir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        expected = installed_wheel.venv / "share" / "man" / f"man{section}" / f"{page}.{section}"
        assert Path(done.stdout.strip()).resolve() == expected.resolve(), done


def test_ctl_version_is_the_installed_one_without_a_daemon(installed_wheel, tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = installed_wheel.run("dirtylogctl", "-s", tmp_path / "nobody.sock", "--version").stdout
    assert out == f"dirtylogctl {project['version']}\n"


@pytest.fixture
def kvm_device():
    need(os.path.exists("/dev/kvm"), "/dev/kvm is absent")
    need(os.access("/dev/kvm", os.R_OK | os.W_OK), "/dev/kvm is not readable and writable")


def query_vms(daemon) -> list[dict]:
    return json.loads(daemon.ctl("--json", "qmp", "query-vms").stdout)


@pytest.mark.kernel
def test_kvm_backend_vm_from_the_wheel(kvm_device, wheel_daemon):
    """The kvm backend lives in kvmshim.x86 and kvmshim.backends.kvm, the modules a wheel once
    lacked; the daemon only imports them when such a VM is created."""
    wheel_daemon.ctl("vm", "create", "--backend", "kvm", "--slot", "0:0:1M", "wheel-kvm")
    (vm,) = query_vms(wheel_daemon)
    assert (vm["name"], vm["backend"]) == ("wheel-kvm", "kvm"), vm
    assert [(s["slot"], s["guest-phys-addr"], s["size"]) for s in vm["memslots"]] == [
        (0, 0, MiB)
    ], vm
    assert "wheel-kvm  kvm" in wheel_daemon.ctl("vm", "list").stdout

    wheel_daemon.ctl("vm", "remove", "wheel-kvm")
    assert query_vms(wheel_daemon) == []
    status = wheel_daemon.stop()
    log = wheel_daemon.output()
    assert status == 0, f"dirtylogd exited {status}:\n{log}"
    assert "Traceback" not in log, log


def test_ctl_lists_vms(wheel_daemon):
    """dirtylogctl needs qemu.qmp and rich: runtime dependencies, not the test extra's."""
    assert wheel_daemon.ctl("vm", "list").stdout.startswith("NAME")
    wheel_daemon.ctl("vm", "create", "--backend", "softmmu", "--slot", "0:0:1M", "wheel-soft")
    listing = wheel_daemon.ctl("vm", "list").stdout
    assert listing.splitlines()[0].split()[:2] == ["NAME", "BACKEND"], listing
    assert "wheel-soft  softmmu" in listing, listing
    wheel_daemon.ctl("vm", "remove", "wheel-soft")
    assert wheel_daemon.stop() == 0, wheel_daemon.output()
