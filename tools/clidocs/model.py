"""An argparse parser as plain data: the one place that reads argparse's private attributes.

Both renderers (man pages, shell completion) work on :class:`Command`, so what argparse keeps
where (``_actions``, ``_SubParsersAction``, ``_choices_actions``) is known here only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# A value completes as a file name or a directory when its metavar says it is one.
FILE_METAVARS = frozenset({"FILE", "PATH"})
DIR_METAVARS = frozenset({"DIR"})


@dataclass(frozen=True)
class Option:
    """A flag: ``flags`` as written (``-s``, ``--socket``); ``metavar`` None if it takes no
    value."""

    flags: tuple[str, ...]
    metavar: str | None
    help: str
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    required: bool = False
    exits: bool = False  # --help, --version: nothing else matters after them
    default: str = ""  # shown where the help does not say it; '' for none

    @property
    def completes(self) -> str:
        """What the value is: 'file', 'dir', 'choices' or '' (free text)."""
        return _completes(self.metavar, self.choices)


@dataclass(frozen=True)
class Positional:
    name: str
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False  # nargs '?' or '*'
    many: bool = False  # nargs '+' or '*'

    @property
    def completes(self) -> str:
        return _completes(self.name, self.choices)


@dataclass(frozen=True)
class Group:
    """Mutually exclusive options, each named by its first flag."""

    flags: tuple[str, ...]
    required: bool


@dataclass(frozen=True)
class Command:
    """A program or one of its subcommands; ``path`` is ('dirtylogctl', 'vm', 'create')."""

    path: tuple[str, ...]
    summary: str  # the line in its parent's list of commands
    description: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    subcommands: tuple[Command, ...] = ()
    groups: tuple[Group, ...] = ()

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def walk(self) -> list[Command]:
        """This command and every command below it, parents first."""
        return [self, *(c for sub in self.subcommands for c in sub.walk())]


def _completes(metavar: str | None, choices: tuple[str, ...]) -> str:
    if choices:
        return "choices"
    if metavar in FILE_METAVARS:
        return "file"
    if metavar in DIR_METAVARS:
        return "dir"
    return ""


def _help(action: argparse.Action, prog: str) -> str:
    """The help text as argparse prints it (``%(default)s`` and friends filled in)."""
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if isinstance(params.get("choices"), dict):  # subparsers' choices: not for help text
        params.pop("choices")
    return action.help % params


def _choices(action: argparse.Action) -> tuple[str, ...]:
    return tuple(str(c) for c in action.choices) if action.choices else ()


def _default(action: argparse.Action) -> str:
    """The default, unless the help says it already (in words or as %(default)s) or there is
    none worth saying."""
    said = "default" in (action.help or "")
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or said:
        return ""
    return str(action.default)


def _option(action: argparse.Action, prog: str) -> Option:
    takes_value = action.nargs != 0
    metavar = action.metavar or (action.dest.upper() if takes_value else None)
    if not isinstance(metavar, str | None):
        raise TypeError(f"{action.option_strings}: a tuple metavar is not supported")
    return Option(
        flags=tuple(action.option_strings),
        metavar=metavar if takes_value else None,
        help=_help(action, prog),
        choices=_choices(action),
        repeatable=isinstance(action, argparse._AppendAction | argparse._CountAction),
        required=action.required,
        exits=isinstance(action, argparse._HelpAction | argparse._VersionAction),
        default=_default(action),
    )


def _positional(action: argparse.Action, prog: str) -> Positional:
    name = action.metavar or action.dest
    if not isinstance(name, str):
        raise TypeError(f"{action.dest}: a tuple metavar is not supported")
    if action.nargs not in (None, "?", "+", "*"):
        raise TypeError(f"{name}: nargs={action.nargs!r} is not supported")
    return Positional(
        name=name,
        help=_help(action, prog),
        choices=_choices(action),
        optional=action.nargs in ("?", "*"),
        many=action.nargs in ("+", "*"),
    )


def command(
    parser: argparse.ArgumentParser, path: tuple[str, ...] | None = None, summary: str = ""
) -> Command:
    """``parser`` and, recursively, its subcommands, with hidden (SUPPRESS) arguments left out."""
    path = path or (parser.prog,)
    options: list[Option] = []
    positionals: list[Positional] = []
    subcommands: list[Command] = []
    for action in parser._actions:
        if action.help is argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            summaries = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias maps to a parser already listed
                    seen.add(id(sub))
                    subcommands.append(command(sub, (*path, name), summaries.get(name, "")))
        elif action.option_strings:
            options.append(_option(action, parser.prog))
        else:
            positionals.append(_positional(action, parser.prog))
    groups = tuple(
        Group(tuple(a.option_strings[0] for a in g._group_actions), g.required)
        for g in parser._mutually_exclusive_groups
    )
    return Command(
        path=path,
        summary=summary,
        description=parser.description or summary,
        options=tuple(options),
        positionals=tuple(positionals),
        subcommands=tuple(subcommands),
        groups=groups,
    )
