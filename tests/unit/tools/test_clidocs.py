"""The man pages and completion scripts are generated from the parsers, and committed as
generated: like docs/protocol.md, a file that differs from what the parsers give now fails."""

import argparse
import os

import pytest

from dirtylogctl import cli
from dirtylogd.ops import config
from tools.clidocs import __main__ as clidocs_main
from tools.clidocs import pages
from tools.clidocs.model import command
from tools.clidocs.roff import escape, sentence

REGENERATE = "run: python -m tools.clidocs"


@pytest.mark.parametrize("name", sorted(pages.generate()))
def test_the_committed_file_is_what_the_parsers_give_now(name):
    path = pages.REPO / name
    assert path.is_file(), f"{name} is missing; {REGENERATE}"
    assert path.read_text(encoding="utf-8") == pages.generate()[name], REGENERATE


def test_what_is_generated_does_not_depend_on_who_generates_it(monkeypatch):
    """Not the user, $XDG_RUNTIME_DIR, $DIRTYLOGD_SOCKET or the terminal's width."""
    expected = pages.generate()
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    for name, value in [
        ("XDG_RUNTIME_DIR", "/run/user/4242"),
        ("DIRTYLOGD_SOCKET", "/elsewhere/q.sock"),
        ("COLUMNS", "37"),
    ]:
        monkeypatch.setenv(name, value)
    assert pages.generate() == expected


@pytest.mark.parametrize(
    ("parser", "page"),
    [
        (config.build_parser(), "docs/man/dirtylogd.8"),
        (cli.build_parser(), "docs/man/dirtylogctl.1"),
    ],
)
def test_the_man_page_has_every_command_and_option(parser, page):
    text = (pages.REPO / page).read_text()
    root = command(parser)
    for cmd in root.walk()[1:]:
        if not cmd.subcommands:
            assert f".SS {escape(' '.join(cmd.path[1:]))}\n" in text
    for cmd in root.walk():
        for option in cmd.options:
            assert all(f"\\fB{escape(flag)}\\fR" in text for flag in option.flags), option


def test_the_model_reads_subcommands_groups_and_values():
    root = command(cli.build_parser())
    by_name = {c.name: c for c in root.walk()}
    create = by_name["dirtylogctl vm create"]
    assert create.summary == "create a VM"
    backend = next(o for o in create.options if o.flags == ("--backend",))
    assert (backend.choices, backend.default, backend.completes) == (
        ("auto", "softmmu", "kvm"),
        "auto",
        "choices",
    )
    slot = next(o for o in create.options if o.flags == ("--slot",))
    assert slot.repeatable and slot.metavar == "SLOT:GPA:SIZE[:nolog]"
    clear = by_name["dirtylogctl clear"]
    assert [(g.flags, g.required) for g in clear.groups] == [(("--all", "--bitmap-file"), True)]
    socket = root.options[1]
    assert socket.flags == ("-s", "--socket") and socket.completes == "file"
    assert [p.name for p in by_name["dirtylogctl io-mark"].positionals] == ["vm", "GPA:LENGTH"]
    assert by_name["dirtylogctl io-mark"].positionals[1].many


def test_help_templates_are_filled_in_and_hidden_arguments_left_out():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--n", type=int, default=3, help="%(prog)s takes %(default)s")
    parser.add_argument("--secret", help=argparse.SUPPRESS)
    (help_, n) = command(parser).options
    assert n.help == "x takes 3" and n.default == ""  # the help says the default already
    assert help_.exits


@pytest.mark.parametrize(
    ("text", "roff"),
    [
        ("--all", "\\-\\-all"),
        ("a\\b", "a\\eb"),
        (".starts with a dot", "\\&.starts with a dot"),
        ("'quoted", "\\&'quoted"),
        ("1.5\u00d7, \u00b5s \u2014 fine", "1.5\\[u00D7], \\[u00B5]s \\[u2014] fine"),
    ],
)
def test_roff_escapes(text, roff):
    assert escape(text) == roff


def test_help_fragments_become_sentences():
    assert sentence("create a VM") == "Create a VM."
    assert sentence("JSON object.") == "JSON object."
    assert sentence("") == ""


def test_check_mode_names_stale_files_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clidocs_main, "REPO", tmp_path)
    assert clidocs_main.main(["--check"]) == 1
    assert sorted(capsys.readouterr().out.split()[1::2]) == sorted(pages.generate())
    assert list(tmp_path.iterdir()) == []
    assert clidocs_main.main([]) == 0
    assert clidocs_main.main(["--check"]) == 0
