#!/usr/bin/env python3
"""Fail on an import cycle between the project's packages, lazy (in-function) imports included.

    .venv/bin/python scripts/check_imports.py [ROOT]      # exit 1 and one line per cycle; 0 when acyclic

The layering it keeps: handler and isic import no other package of ours; exporter builds on handler (and
isic); train, client (offline mode) and testkit build on those; bench, scripts, deploy and tests sit on top.
ruff's TID rules (pyproject.toml) hold the finer rules; this holds the order. Stdlib only.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("handler", "isic", "exporter", "train", "client", "testkit", "bench", "scripts", "deploy", "tests")


def package_graph(root: Path) -> dict[str, dict[str, str]]:
    """package -> {imported package: 'file:line' of the first such import}."""
    graph: dict[str, dict[str, str]] = {p: {} for p in PACKAGES}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            try:
                tree = ast.parse(f.read_text(), str(f))
            except (SyntaxError, UnicodeDecodeError) as e:
                raise SystemExit(f"check_imports: error: cannot parse {f}: {e}") from None
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                         else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in graph and top != pkg:
                        graph[pkg].setdefault(top, f"{f.relative_to(root)}:{node.lineno}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Each elementary cycle once (as found by depth-first search from each package in order)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(path: list[str]) -> None:
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                if frozenset(path) not in seen:
                    seen.add(frozenset(path))
                    found.append([*path, nxt])
            elif nxt not in path and PACKAGES.index(nxt) > PACKAGES.index(path[0]):
                walk([*path, nxt])

    for start in PACKAGES:
        walk([start])
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    root = Path(ap.parse_args(argv).root)
    graph = package_graph(root)
    bad = cycles(graph)
    for cyc in bad:
        where = ", ".join(graph[a][b] for a, b in zip(cyc, cyc[1:], strict=False))
        print(f"check_imports: error: import cycle {' -> '.join(cyc)} ({where})", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
