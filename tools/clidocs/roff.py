"""Man pages in man(7) roff from a :class:`~tools.clidocs.model.Command` and a few sections of
prose.

Only the portable core of the man macros (``.TH .SH .SS .PP .TP .RS .RE .nf .fi``, ``\\fB``
and friends) so that groff and mandoc render it alike. Every ``-`` is written ``\\-``, the
minus sign a reader copies out of an option, and every character outside ASCII as
``\\[uXXXX]``, which needs no input encoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tools.clidocs.model import Command, Option, Positional


@dataclass(frozen=True)
class Example:
    """Lines shown as typed, unfilled and indented (a shell session, a config file)."""

    lines: tuple[str, ...]


# A section's content: a paragraph, a (term, text) entry of a list, or an example.
Item = str | tuple[str, str] | Example


@dataclass(frozen=True)
class Section:
    title: str
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Page:
    """One man page: the parser's command, and what a parser cannot say."""

    command: Command
    section: str  # "1" or "8"
    summary: str  # NAME's line after the dash
    source: str  # the footer's left: package and version
    manual: str  # the header's centre: "User Commands", "System Administration"
    description: tuple[Item, ...] = ()  # after the parser's description
    before_options: tuple[Section, ...] = ()  # e.g. CONFIGURATION, right after DESCRIPTION
    sections: tuple[Section, ...] = ()  # after OPTIONS (and COMMANDS): EXIT STATUS, FILES...
    see_also: tuple[tuple[str, str], ...] = ()  # (name, section)


def escape(text: str) -> str:
    """Text for a roff line: backslash, minus, non-ASCII; a leading . or ' made literal."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\e")
        elif ch == "-":
            out.append("\\-")
        elif ord(ch) > 126:
            out.append(f"\\[u{ord(ch):04X}]")
        else:
            out.append(ch)
    line = "".join(out)
    return "\\&" + line if line.startswith((".", "'")) else line


def sentence(text: str) -> str:
    """An argparse help fragment ('create a VM') as a sentence ('Create a VM.')."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _value(option: Option) -> str:
    if option.metavar is None:
        return ""
    if option.choices:
        return "|".join(_bold(c) for c in option.choices)
    return _italic(option.metavar)


def option_term(option: Option) -> str:
    """``-s``, ``--socket`` ``PATH``, as a list entry's term."""
    value = _value(option)
    flags = ", ".join(_bold(f) for f in option.flags)
    return f"{flags} {value}" if value else flags


def _synopsis_option(option: Option) -> str:
    # unpaddable spaces (\ ) keep a flag and its value on one line when the synopsis wraps
    value = _value(option)
    return _bold(option.flags[0]) + (f"\\ {value}" if value else "")


def _synopsis_positional(positional: Positional) -> str:
    word = _italic(positional.name)
    if positional.many:
        word += "\\ ..."
    return f"[{word}]" if positional.optional else word


def synopsis(command: Command) -> list[str]:
    """The command line, one word group a line: roff fills and wraps them."""
    lines = [f'.SY "{escape(command.name)}"']
    grouped = {flag: group for group in command.groups for flag in group.flags}
    done: set[str] = set()
    by_flag = {o.flags[0]: o for o in command.options}
    for option in command.options:
        first = option.flags[0]
        if first in done:
            continue
        group = grouped.get(first)
        if group is not None:
            members = " | ".join(_synopsis_option(by_flag[f]) for f in group.flags)
            lines.append(f"({members})" if group.required else f"[{members}]")
            done.update(group.flags)
            continue
        word = _synopsis_option(option) + ("\\ ..." if option.repeatable else "")
        lines.append(word if option.required else f"[{word}]")
    lines += [_synopsis_positional(p) for p in command.positionals]
    if command.subcommands:
        lines.append(_italic("COMMAND") + "\\ ...")
    lines.append(".YS")
    # \& after a closing "...": roff would take it for the end of a sentence and add a space
    return [line + "\\&" if line.endswith(("...", "...]", "...)")) else line for line in lines]


def _items(items: Sequence[Item]) -> list[str]:
    lines: list[str] = []
    for item in items:
        if isinstance(item, Example):
            lines += [".PP", ".RS 4", ".nf", *map(escape, item.lines), ".fi", ".RE"]
        elif isinstance(item, tuple):
            term, text = item
            lines += [".TP", _bold(term), escape(text)]
        else:
            lines += [".PP", escape(item)]
    return lines


def _option_entries(command: Command, with_help_flag: bool) -> list[str]:
    lines: list[str] = []
    for option in command.options:
        if option.exits and not with_help_flag and "--help" in option.flags:
            continue
        text = sentence(option.help)
        if option.default:
            text = f"{text} Default: {option.default}.".strip()
        lines += [".TP", option_term(option), escape(text) if text else "\\&"]
    for positional in command.positionals:
        if positional.help or positional.choices:
            text = sentence(positional.help)
            if positional.choices:
                text = f"{text} One of: {', '.join(positional.choices)}.".strip()
            lines += [".TP", _italic(positional.name), escape(text)]
    return lines


def _commands(root: Command) -> list[str]:
    """One subsection per command that does something (vm create, not vm)."""
    lines = [".SH COMMANDS"]
    for command in root.walk()[1:]:
        if command.subcommands:
            continue
        lines += [".SS " + escape(" ".join(command.path[1:]))]
        lines += synopsis(command)
        lines += [".PP", escape(sentence(command.description))]
        lines += _option_entries(command, with_help_flag=False)
    return lines


def render(page: Page, generator: str) -> str:
    """The whole page; ``generator`` names the command that writes it, in a comment."""
    command = page.command
    title = command.name.upper()
    lines = [
        f'.\\" Generated by {generator} from the argument parser of {command.name}; do not edit.',
        f'.TH {escape(title)} {page.section} "" "{escape(page.source)}" "{escape(page.manual)}"',
        # no hyphenation, ragged right: option names and paths must read as they are typed
        # (HY is the mode the man macros restore, e.g. at .YS)
        ".nr HY 0",
        ".nh",
        ".ad l",
        ".SH NAME",
        f"{escape(command.name)} \\- {escape(page.summary)}",
        ".SH SYNOPSIS",
        *synopsis(command),
        ".SH DESCRIPTION",
        ".PP",
        escape(sentence(command.description)),
        *_items(page.description),
    ]
    for section in page.before_options:
        lines += [".SH " + escape(section.title.upper()), *_items(section.items)]
    lines += [".SH OPTIONS", *_option_entries(command, with_help_flag=True)]
    if command.subcommands:
        lines += _commands(command)
    for section in page.sections:
        lines += [".SH " + escape(section.title.upper()), *_items(section.items)]
    if page.see_also:
        refs = [f".BR {escape(name)} ({sec})" for name, sec in page.see_also]
        lines += [".SH SEE ALSO", *(ref + "," for ref in refs[:-1]), refs[-1]]
    return "\n".join(lines) + "\n"
