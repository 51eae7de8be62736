"""The generated files: man pages and completion scripts of dirtylogd and dirtylogctl.

Options, commands and their help come from the programs' own parsers; the prose a parser cannot
hold (exit status, files, environment) is here. pyproject.toml's data-files ship the results
to ``share/man``, ``share/bash-completion/completions`` and ``share/zsh/site-functions``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from dirtylogctl import cli
from dirtylogctl.paths import DEFAULT_SOCKET_RULE, SOCKET_ENV
from dirtylogd.ops import config
from tools.clidocs import completion, roff
from tools.clidocs.model import command
from tools.clidocs.roff import Example, Page, Section

REPO = Path(__file__).resolve().parents[2]
GENERATOR = "python -m tools.clidocs"
EXAMPLE_CONFIG = "docs/dirtylogd.toml"


def _version() -> str:
    """The project's version from pyproject.toml: the same whoever generates, installed or not."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def dirtylogd_page(source: str) -> Page:
    return Page(
        command=command(config.build_parser()),
        section="8",
        summary="serve dirty-page bitmaps of virtual machines over QMP",
        source=source,
        manual="System Administration",
        description=(
            "dirtylogd keeps the dirty-page bitmaps of virtual machines, as Linux KVM's "
            "KVM_GET_DIRTY_LOG does, for live-migration tools: each consumer of a VM takes only "
            "its own pages, and writes that bypass the guest's page tables (DMA) are merged in "
            "when reported. Clients speak QMP on a unix socket: dirtylogctl(1), qmp-shell, or "
            "QEMU's qemu.qmp library.",
            "It runs until SIGTERM or SIGINT, then saves every VM with its consumers' pending "
            "bits (unless --state-dir is none) and exits; the next start restores them.",
        ),
        before_options=(
            Section(
                "Configuration file",
                (
                    "--config FILE reads a TOML file whose keys are the long options without "
                    "their dashes (max-clients = 300); an option on the command line wins over "
                    "the file. Each key takes the TOML type of its option: true or false for "
                    "--demo, an integer for the counts and sizes, a number for "
                    "--negotiation-timeout, a name, a number or an array of them for --allow-uid "
                    "and --allow-gid, a string for the rest. An unknown key or a value of "
                    'another type (demo = "false") is an error that names the key, and '
                    "dirtylogd exits with status 2.",
                    "Every key, with its default, commented: share/doc/dirtylogd/dirtylogd.toml "
                    "in the installation (" + EXAMPLE_CONFIG + " in the source).",
                ),
            ),
        ),
        sections=(
            Section(
                "Exit status",
                (
                    ("0", "Stopped by SIGTERM or SIGINT, every VM saved."),
                    (
                        "1",
                        "Could not start or keep running (the socket or a directory in use "
                        "or unusable, the metrics port taken); the reason names the option that "
                        "chooses another.",
                    ),
                    ("2", "A malformed option or configuration file; nothing was started."),
                ),
            ),
            Section(
                "Files",
                (
                    (
                        "/run/dirtylogd/qmp.sock",
                        "The QMP socket (--socket) as root. Another "
                        "user's: $XDG_RUNTIME_DIR/dirtylogd/qmp.sock, or without $XDG_RUNTIME_DIR "
                        "/tmp/dirtylogd-UID/dirtylogd/qmp.sock.",
                    ),
                    (
                        "/run/dirtylogd/ram",
                        "The VMs' RAM files (--runtime-dir) as root; the "
                        "systemd units use /run/dirtylogd/ram, a tmpfs of its own. Another user's: "
                        "$XDG_RUNTIME_DIR/dirtylogd/ram, or /tmp/dirtylogd-UID/dirtylogd/ram.",
                    ),
                    (
                        "/var/lib/dirtylogd",
                        "VM records and saved pending bits (--state-dir) as "
                        "root. Another user's: $XDG_STATE_HOME/dirtylogd, or without "
                        "$XDG_STATE_HOME ~/.local/state/dirtylogd.",
                    ),
                ),
            ),
            Section(
                "Environment",
                (
                    (
                        "XDG_RUNTIME_DIR, XDG_STATE_HOME, HOME",
                        "Where a user's daemon keeps its socket, RAM files and state (FILES).",
                    ),
                    (
                        "LISTEN_FDS, LISTEN_PID",
                        "A socket passed by systemd (dirtylogd.socket); --socket is then ignored.",
                    ),
                    (
                        "NOTIFY_SOCKET, WATCHDOG_USEC",
                        "Readiness, status and watchdog notifications to systemd (Type=notify).",
                    ),
                    ("JOURNAL_STREAM", "Log lines go to the journal with their priority."),
                ),
            ),
            Section(
                "Examples",
                (
                    "A simulated VM with a running workload, for a first look:",
                    Example(("dirtylogd --demo", "dirtylogctl rate demo")),
                    "It keeps the VM demo (its RAM file and its record) for the next start; "
                    "dirtylogctl vm remove demo, while it runs, removes both. dirtylogd --demo "
                    "--state-dir none keeps nothing.",
                    "As a service: dirtylogd-install-units, then "
                    "systemctl enable --now dirtylogd.socket.",
                ),
            ),
        ),
        see_also=(("dirtylogctl", "1"), ("qmp-shell", "1"), ("systemd.socket", "5")),
    )


def dirtylogctl_page(source: str) -> Page:
    return Page(
        command=command(cli.build_parser(fallback=DEFAULT_SOCKET_RULE)),
        section="1",
        summary="ask dirtylogd for dirty pages, and migrate a VM's memory with them",
        source=source,
        manual="User Commands",
        description=(
            "dirtylogctl runs one command against dirtylogd(8) over its QMP socket and prints "
            "the answer as a table, or as the daemon's JSON with --json. migrate pre-copies a "
            "VM's memory to a file or to a migrate-receive on another host using the dirty "
            "log; migrate-receive needs no daemon.",
        ),
        sections=(
            Section(
                "Exit status",
                (
                    ("0", "Done."),
                    (
                        "1",
                        "Failed otherwise (a file that cannot be written, a migration that "
                        "failed), with the reason.",
                    ),
                    ("2", "A malformed argument; nothing was asked of the daemon."),
                    (
                        "3",
                        "The daemon refused the command (its QMP error class and reason), "
                        "e.g. no such VM.",
                    ),
                    ("4", "No connection to the daemon, with what to do next."),
                    ("5", "migrate --verify: the destination differs from the paused source."),
                    ("130", "Interrupted (Ctrl-C)."),
                    (
                        "141",
                        "Standard output closed or its reader gone (| head): no message, as "
                        "for a program killed by SIGPIPE.",
                    ),
                ),
            ),
            Section(
                "Environment",
                (
                    (SOCKET_ENV, "The daemon's socket, when -s is not given."),
                    ("XDG_RUNTIME_DIR", "Where a user's daemon listens by default (FILES)."),
                ),
            ),
            Section(
                "Files",
                (
                    "The socket, unless -s or $"
                    + SOCKET_ENV
                    + " names another: "
                    + DEFAULT_SOCKET_RULE
                    + ".",
                ),
            ),
            Section(
                "Examples",
                (
                    Example(
                        (
                            "dirtylogctl vm list",
                            "dirtylogctl consumer add demo mig --manual-protect",
                            "dirtylogctl get demo 0 --consumer mig --out bitmap.bin",
                            "dirtylogctl migrate demo /tmp/demo.img --verify --resume",
                        )
                    ),
                ),
            ),
        ),
        see_also=(("dirtylogd", "8"), ("qmp-shell", "1")),
    )


def generate() -> dict[str, str]:
    """Every generated file: its path in the repository, its text."""
    source = f"dirtylogd {_version()}"
    files = {}
    for page in (dirtylogd_page(source), dirtylogctl_page(source)):
        name = page.command.path[0]
        files[f"docs/man/{name}.{page.section}"] = roff.render(page, GENERATOR)
        files[f"completions/bash/{name}"] = completion.bash(page.command, GENERATOR)
        files[f"completions/zsh/_{name}"] = completion.zsh(page.command, GENERATOR)
    return files
