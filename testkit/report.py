"""docs/RELIABILITY.md is written by more than one tool (the reliability tests, bench/fuzz.py): each replaces
only its own block, between markers, so none erases another's figures."""

from __future__ import annotations

import os
from pathlib import Path


def replace_block(path: Path, name: str, text: str) -> None:
    """Put `text` between <!-- begin NAME --> and <!-- end NAME --> in `path` (appended when absent)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
