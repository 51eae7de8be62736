"""``python -m tools.clidocs [--check]``: write the man pages and completion scripts, or (with
--check) write nothing and exit 1 naming the files that are not what the parsers give now."""

from __future__ import annotations

import argparse
import sys

from tools.clidocs.pages import REPO, generate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.clidocs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for name, text in generate().items():
        path = REPO / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "stale" if args.check else "wrote"
    for name in stale:
        print(f"{verb} {name}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
