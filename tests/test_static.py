"""Static checks as tests: mypy, ruff, and the direction of imports between the rooms.

* ``test_mypy`` runs ``python -m mypy`` from the repository root with the ``[tool.mypy]`` config
  of pyproject.toml (the shipped packages kvmshim, dirtylogd, dirtylogctl; not the tests).
* ``test_ruff_check`` and ``test_ruff_format`` run ``ruff check .`` and ``ruff format --check .``.
* ``test_imports_point_the_right_way`` parses every module of the three packages with ``ast``
  and applies :data:`RULES`.

mypy and ruff come with the ``test`` extra. When one is missing the test skips with the reason,
unless DIRTYLOGD_REQUIRE_ALL=1 (CI), where it fails.

What counts as an import
------------------------
Every ``import`` and ``from ... import`` statement anywhere in a module: at the top, inside
functions and classes, under ``try:``, and under ``if TYPE_CHECKING:``. TYPE_CHECKING-only imports
count for every rule: they are real type dependencies (type-checking the client would need the
server's sources; type-checking the server would need the client's dependencies installed), and a
name imported for annotations tends to become a runtime import later. ``importlib.import_module``
and ``__import__`` with a literal module name count too. Relative imports are resolved against
the importing module's package. ``from a import b`` imports ``a`` and, when ``b`` is a module,
``a.b``: both names are checked, so ``from dirtylogd import service`` is caught by a rule
against ``dirtylogd.service``.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import need

REPO = Path(__file__).resolve().parents[1]

# Each top-level package and the source root it is imported from (pyproject.toml's
# [tool.setuptools.packages.find] where = [".", "daemon"]).
PACKAGES: dict[str, Path] = {
    "kvmshim": REPO,
    "dirtylogd": REPO / "daemon",
    "dirtylogctl": REPO / "daemon",
}


@dataclass(frozen=True)
class Rule:
    scope: str  # the importing package (and everything below it)
    forbidden: tuple[str, ...]  # modules it must not import (and everything below them)
    why: str


RULES: tuple[Rule, ...] = (
    Rule(
        "dirtylogctl",
        ("dirtylogd",),
        "the client talks to the server over QMP only; it never imports the server package",
    ),
    Rule(
        "kvmshim",
        ("dirtylogd", "dirtylogctl"),
        "kvmshim is the library under both; it imports neither the server nor the client",
    ),
    Rule(
        "dirtylogd.qmp",
        ("dirtylogd.service", "dirtylogd.api", "dirtylogd.ops"),
        "the wire (dirtylogd.qmp) knows nothing of the vocabulary, the service or ops",
    ),
    Rule(
        "dirtylogd",
        ("qemu", "rich"),
        "the server does not depend on the client's dependencies (qemu.qmp, rich)",
    ),
    Rule(
        "dirtylogctl",
        ("prometheus_client", "psutil"),
        "the client does not depend on the server's dependencies (prometheus-client, psutil)",
    ),
)


# --- the import checker ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One imported module name, as resolved to an absolute dotted name."""

    name: str
    line: int
    statement: str  # the source as written, for the message
    type_checking: bool


@dataclass(frozen=True)
class Violation:
    module: str
    path: Path
    line: int
    imported: str
    statement: str
    type_checking: bool
    rule: Rule

    def __str__(self) -> str:
        where = " (under TYPE_CHECKING)" if self.type_checking else ""
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return (
            f"{path}:{self.line}: {self.module} imports {self.imported}{where}: "
            f"`{self.statement}` — {self.rule.why}"
        )


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING`` (any module alias)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".") if package else []
    if level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = parts[: len(parts) - (level - 1)]
    return ".".join([*base, target] if target else base)


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.is_package = is_package
        self.imports: list[Import] = []
        self._type_checking = 0

    def _add(self, name: str, node: ast.AST) -> None:
        self.imports.append(
            Import(
                name=name,
                line=getattr(node, "lineno", 0),
                statement=ast.unparse(node),
                type_checking=self._type_checking > 0,
            )
        )

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.visit(node.test)
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = resolve_relative(self.module, self.is_package, node.level, node.module)
        else:
            base = node.module or ""
        self._add(base, node)
        for alias in node.names:
            if alias.name != "*":
                self._add(f"{base}.{alias.name}", node)  # may be a submodule

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
            isinstance(func, ast.Attribute) and func.attr == "import_module"
        )
        if (
            dynamic
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def imports_of(
    source: str, module: str, is_package: bool, path: Path | str = "<string>"
) -> list[Import]:
    """Every import in ``source`` (the text of ``module``), resolved to absolute names."""
    collector = _ImportCollector(module, is_package)
    collector.visit(ast.parse(source, filename=str(path)))
    return collector.imports


def check_module(
    source: str,
    module: str,
    is_package: bool,
    path: Path | str = "<string>",
    rules: Sequence[Rule] = RULES,
) -> list[Violation]:
    """The rules that ``module``'s imports break, one violation per (import, rule)."""
    found: dict[tuple[int, str, Rule], Violation] = {}
    for imp in imports_of(source, module, is_package, path):
        for rule in rules:
            if not _within(module, rule.scope):
                continue
            for forbidden in rule.forbidden:
                if _within(imp.name, forbidden):
                    # report `from dirtylogd import service` once, as its widest name
                    key = (imp.line, imp.statement, rule)
                    if key not in found:
                        found[key] = Violation(
                            module,
                            Path(path),
                            imp.line,
                            imp.name,
                            imp.statement,
                            imp.type_checking,
                            rule,
                        )
    return list(found.values())


def modules(packages: Mapping[str, Path]) -> Iterator[tuple[str, Path, bool]]:
    """(dotted name, file, is a package __init__) for every module of ``packages``."""
    for package, root in packages.items():
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            yield ".".join(parts), path, is_package


def check_tree(
    packages: Mapping[str, Path] = PACKAGES, rules: Sequence[Rule] = RULES
) -> list[Violation]:
    violations: list[Violation] = []
    for module, path, is_package in modules(packages):
        source = path.read_text(encoding="utf-8")
        violations += check_module(source, module, is_package, path, rules)
    return violations


# --- the import rules on the real tree ------------------------------------------------------------
def test_every_source_package_is_checked():
    """A new package under daemon/ (or a moved one) must be added to PACKAGES, not go unchecked."""
    for package, root in PACKAGES.items():
        assert (root / package / "__init__.py").is_file(), f"{package} is not under {root}"
    under_daemon = {p.parent.name for p in (REPO / "daemon").glob("*/__init__.py")}
    assert under_daemon <= set(PACKAGES), f"unchecked packages: {under_daemon - set(PACKAGES)}"


def test_the_checker_sees_the_real_imports():
    """A parser that found nothing would pass every rule: make sure it reads the tree."""
    found = {
        (module, imp.name)
        for module, path, is_package in modules(PACKAGES)
        for imp in imports_of(path.read_text(encoding="utf-8"), module, is_package, path)
    }
    assert ("dirtylogd.qmp.session", "dirtylogd.errors") in found
    assert ("dirtylogctl.cli", "qemu.qmp") in found
    assert ("kvmshim.kvm", "kvmshim.abi") in found
    assert len({module for module, _ in found}) >= 40


def test_imports_point_the_right_way():
    violations = check_tree()
    assert not violations, "forbidden imports:\n" + "\n".join(map(str, violations))


# --- the checker itself: it must catch what it is meant to catch ----------------------------------
def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_the_checker_reports_synthetic_forbidden_imports(tmp_path):
    daemon = tmp_path / "daemon"
    _write(
        daemon,
        {
            "dirtylogd/__init__.py": "",
            "dirtylogd/errors.py": "",
            "dirtylogd/qmp/__init__.py": "",
            "dirtylogd/qmp/framing.py": "",
            "dirtylogd/service/__init__.py": "",
            "dirtylogd/service/vm.py": "",
            "dirtylogd/qmp/bad.py": """\
                from __future__ import annotations

                from typing import TYPE_CHECKING

                from . import framing
                from ..errors import QmpError

                if TYPE_CHECKING:
                    from dirtylogd.api.handlers import Handlers


                def later():
                    from ..service import vm
                    import rich.table
                    return vm
                """,
            "dirtylogctl/__init__.py": "",
            "dirtylogctl/bad.py": """\
                import importlib

                import psutil

                from dirtylogd import service

                errors = importlib.import_module("dirtylogd.errors")
                """,
        },
    )
    _write(
        tmp_path,
        {
            "kvmshim/__init__.py": "",
            "kvmshim/bad.py": "try:\n    import dirtylogctl.cli\nexcept ImportError:\n    pass\n",
        },
    )
    packages = {"kvmshim": tmp_path, "dirtylogd": daemon, "dirtylogctl": daemon}
    got = {(v.module, v.line, v.imported, v.type_checking) for v in check_tree(packages)}
    assert got == {
        ("dirtylogd.qmp.bad", 9, "dirtylogd.api.handlers", True),
        ("dirtylogd.qmp.bad", 13, "dirtylogd.service", False),
        ("dirtylogd.qmp.bad", 14, "rich.table", False),
        ("dirtylogctl.bad", 3, "psutil", False),
        ("dirtylogctl.bad", 5, "dirtylogd", False),
        ("dirtylogctl.bad", 7, "dirtylogd.errors", False),
        ("kvmshim.bad", 2, "dirtylogctl.cli", False),
    }
    message = "\n".join(map(str, check_tree(packages)))
    assert "dirtylogd/qmp/bad.py:13: dirtylogd.qmp.bad imports dirtylogd.service" in message
    assert "`from ..service import vm`" in message
    assert "(under TYPE_CHECKING)" in message


def test_the_checker_passes_allowed_imports():
    source = """\
        import dirtylogdx
        import qemuish
        from dirtylogd.qmp import framing
        from dirtylogd import errors, __version__
        from . import telemetry
        """
    assert check_module(textwrap.dedent(source), "dirtylogd.qmp.server", False) == []
    client = "import dirtylogdx\nfrom kvmshim import bitmap\nfrom qemu.qmp import QMPClient\n"
    assert check_module(client, "dirtylogctl.cli", False) == []


@pytest.mark.parametrize(
    ("module", "is_package", "level", "target", "expected"),
    [
        ("dirtylogd.qmp.session", False, 1, "framing", "dirtylogd.qmp.framing"),
        ("dirtylogd.qmp.session", False, 2, "service.vm", "dirtylogd.service.vm"),
        ("dirtylogd.qmp.session", False, 2, None, "dirtylogd"),
        ("dirtylogd.qmp", True, 1, "framing", "dirtylogd.qmp.framing"),
        ("dirtylogd.qmp", True, 2, "api", "dirtylogd.api"),
        ("kvmshim", True, 1, "abi", "kvmshim.abi"),
    ],
)
def test_relative_imports_resolve(module, is_package, level, target, expected):
    assert resolve_relative(module, is_package, level, target) == expected


def test_a_relative_import_past_the_top_is_an_error():
    with pytest.raises(ValueError):
        resolve_relative("kvmshim.abi", False, 3, "x")


# --- mypy and ruff --------------------------------------------------------------------------------
def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    path = shutil.which("ruff")
    need(path is not None, "ruff is not installed (pip install -e '.[test]')")
    assert path is not None
    return [path]


def test_mypy():
    need(
        importlib.util.find_spec("mypy") is not None,
        "mypy is not installed (pip install -e '.[test]')",
    )
    done = _run([sys.executable, "-m", "mypy"])  # [tool.mypy] in pyproject.toml says what
    if done.returncode != 0:
        pytest.fail(f"mypy exited {done.returncode}:\n{done.stdout}{done.stderr}", pytrace=False)


def test_ruff_check():
    done = _run([*_ruff(), "check", "--output-format=concise", "."])
    if done.returncode != 0:
        pytest.fail(f"ruff check:\n{done.stdout}{done.stderr}", pytrace=False)


def test_ruff_format():
    done = _run([*_ruff(), "format", "--check", "."])
    if done.returncode != 0:
        pytest.fail(f"ruff format --check:\n{done.stdout}{done.stderr}", pytrace=False)
