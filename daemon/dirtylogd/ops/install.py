"""`dirtylogd-install-units`: put the shipped systemd files where systemd reads them.

A pip install cannot place files outside its prefix, and Debian refuses system-wide pip
installs (PEP 668), so the documented shape is a venv (``/opt/dirtylogd``) plus this command,
run from that venv. It writes the units, the sysusers and the tmpfiles snippets with
``ExecStart=`` pointing at this installation's ``dirtylogd``, then (when it writes into the
running system) creates the user and directories and reloads systemd. It never enables or
starts anything: that stays the administrator's ``systemctl enable --now dirtylogd.socket``.

The templates are the repository's ``systemd/`` folder, shipped in the wheel as data files
(``<prefix>/share/dirtylogd/systemd``). Every file written starts with a marker line, so a file
someone else wrote is never overwritten (without ``--force``) and ``--remove`` deletes only ours.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# The path the templates name; replaced by the installation's own.
TEMPLATE_EXEC = "/opt/dirtylogd/bin/dirtylogd"
MARKER = "# Installed by dirtylogd-install-units"


@dataclass(frozen=True)
class Target:
    """One shipped file and the folder (under --root) systemd reads it from."""

    name: str
    folder: str  # absolute, relative to the root


TARGETS = (
    Target("dirtylogd.socket", "/etc/systemd/system"),
    Target("dirtylogd.service", "/etc/systemd/system"),
    Target("run-dirtylogd-ram.mount", "/etc/systemd/system"),
    Target("dirtylogd.sysusers.conf", "/etc/sysusers.d"),
    Target("dirtylogd.tmpfiles.conf", "/etc/tmpfiles.d"),
)


class InstallError(Exception):
    """Something this command will not do; the text says what and how to proceed."""


def installed_name(target: Target) -> str:
    """sysusers.d and tmpfiles.d want ``<name>.conf``: the ``dirtylogd.`` stem is the name."""
    if target.name.endswith((".sysusers.conf", ".tmpfiles.conf")):
        return "dirtylogd.conf"
    return target.name


def template_dir() -> Path:
    """The shipped templates: ``<prefix>/share/dirtylogd/systemd`` of this installation, or
    the checkout's ``systemd/`` under an editable install (which installs no data files)."""
    folder = Path(sysconfig.get_path("data")) / "share" / "dirtylogd" / "systemd"
    checkout = Path(__file__).resolve().parents[3] / "systemd"
    for candidate in (folder, checkout):
        if (candidate / "dirtylogd.service").is_file():
            return candidate
    raise InstallError(
        f"the systemd templates are not installed in {folder}; "
        "install dirtylogd from its wheel (pip install dirtylogd-*.whl)"
    )


def render(template: str, executable: str) -> str:
    """The file as installed: the marker, then the template with ``executable`` in ExecStart."""
    if TEMPLATE_EXEC not in template and "ExecStart=" in template:
        raise InstallError(f"template has no {TEMPLATE_EXEC} to replace")
    head = f"{MARKER} for {executable}; change it with a drop-in, a reinstall rewrites it\n"
    return head + template.replace(TEMPLATE_EXEC, executable)


def plan(root: Path, templates: Path, executable: str) -> dict[Path, str]:
    """Destination path -> content, for every target."""
    return {
        root / target.folder.lstrip("/") / installed_name(target): render(
            (templates / target.name).read_text(), executable
        )
        for target in TARGETS
    }


def _ours(path: Path) -> bool:
    with path.open() as f:
        return f.readline().startswith(MARKER)


def write(files: dict[Path, str], force: bool) -> list[str]:
    """Write every file (all checked before any is written); one report line per file."""
    foreign = [p for p in files if p.exists() and not _ours(p)]
    if foreign and not force:
        raise InstallError(
            "not written by dirtylogd-install-units, left alone (--force replaces): "
            + ", ".join(map(str, foreign))
        )
    report = []
    for path, text in files.items():
        if path.exists() and path.read_text() == text:
            report.append(f"unchanged {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, path)
        report.append(f"wrote     {path}")
    return report


def remove(files: dict[Path, str]) -> list[str]:
    """Delete the files this command wrote; others are named and kept."""
    report = []
    for path in files:
        if not path.exists():
            continue
        if _ours(path):
            path.unlink()
            report.append(f"removed   {path}")
        else:
            report.append(f"kept      {path} (not written by dirtylogd-install-units)")
    return report


def systemd_running(root: Path) -> bool:
    """Whether the files went into a running systemd's own tree (sd_booted(3))."""
    return root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()


def apply(files: dict[Path, str], installing: bool) -> list[list[str]]:
    """Make the running system follow the files: users, directories, then a reload."""
    commands = []
    if installing:
        sysusers = next(p for p in files if p.parent.name == "sysusers.d")
        tmpfiles = next(p for p in files if p.parent.name == "tmpfiles.d")
        commands += [
            ["systemd-sysusers", str(sysusers)],
            ["systemd-tmpfiles", "--create", str(tmpfiles)],
        ]
    commands.append(["systemctl", "daemon-reload"])
    for argv in commands:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return commands


def default_executable() -> str:
    """This installation's ``dirtylogd`` (the venv's bin folder)."""
    return str(Path(sysconfig.get_path("scripts")) / "dirtylogd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dirtylogd-install-units",
        description="Install dirtylogd's systemd units, sysusers and tmpfiles snippets for this "
        "installation (ExecStart= points at its dirtylogd). Enables nothing: afterwards, run "
        "'systemctl enable --now dirtylogd.socket'.",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        default="/",
        help="write under DIR (a package's staging tree); only with the default '/' are "
        "systemd-sysusers, systemd-tmpfiles and 'systemctl daemon-reload' run",
    )
    p.add_argument(
        "--executable",
        metavar="PATH",
        default=default_executable(),
        help="the dirtylogd that ExecStart= runs (default: this installation's, %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace files someone else wrote")
    p.add_argument("--remove", action="store_true", help="delete the files this command wrote")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.root)
    try:
        if not os.path.isabs(args.executable):
            raise InstallError(f"--executable must be an absolute path, not {args.executable!r}")
        # Into the running system, ExecStart= must work now; a staging tree may not hold it yet.
        live = root.resolve() == Path("/")
        if live and not args.remove and not os.access(args.executable, os.X_OK):
            raise InstallError(f"{args.executable} is not an executable dirtylogd")
        files = plan(root, template_dir(), args.executable)
        lines = remove(files) if args.remove else write(files, args.force)
        print("\n".join(lines))
        if systemd_running(root):
            for argv_ in apply(files, installing=not args.remove):
                print(f"ran       {' '.join(argv_)}")
        elif live:
            print(
                "systemd is not running: run systemd-sysusers, systemd-tmpfiles --create "
                "and systemctl daemon-reload once it is"
            )
        if not args.remove:
            print("next: systemctl enable --now dirtylogd.socket")
    except (InstallError, OSError) as exc:
        print(f"dirtylogd-install-units: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
