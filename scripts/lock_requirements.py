#!/usr/bin/env python3
"""Write requirements.lock: the serving set (requirements.txt without torch) with the SHA-256 of every file PyPI
serves for each pinned version that a CPython 3.11 or 3.12 on x86-64 Linux can install (and the sdist), so that
scripts/setup.sh installs it with pip --require-hashes from PyPI alone. torch is not in it: it comes from PyTorch's
CPU index, one index for that one name (scripts/setup.sh).

    .venv/bin/python scripts/lock_requirements.py [--index https://pypi.org/simple] [--compare DIR ...]

A maintainer's tool (it reads PyPI's simple index, the same pages pip reads); nothing runs it at install or test
time. --compare DIR (a folder of wheels, or a local simple index's files/) reports, for every pinned file found
there, whether it is byte for byte PyPI's (same SHA-256) or not.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)")
LINK = re.compile(r'<a [^>]*href="([^"#]+)#sha256=([0-9a-f]{64})"[^>]*>([^<]+)</a>')
WANTED_TAGS = ("cp311", "cp312", "abi3", "py3-none-any", "py2.py3-none-any")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(requirements: Path) -> list[tuple[str, str]]:
    out = []
    for line in requirements.read_text().splitlines():
        m = PIN.match(line.strip())
        if m and normalize(m[1]) != "torch":
            out.append((m[1], m[2]))
    return out


def installable(filename: str, name: str, version: str) -> bool:
    """A file of exactly this version that CPython 3.11/3.12 on x86-64 Linux would install (or the sdist)."""
    stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version
    low = filename.lower()
    if not low.startswith(stem.lower() + "-") and not low.startswith(stem.lower() + "."):
        return False
    if low.endswith((".tar.gz", ".zip")):
        return True
    if not low.endswith(".whl"):
        return False
    if any(t in low for t in ("py3-none-any", "py2.py3-none-any")):
        return True
    return "x86_64" in low and "manylinux" in low and any(t in low for t in ("cp311", "cp312", "abi3"))


def index_files(index: str, name: str, version: str) -> dict[str, str]:
    """filename -> sha256 from the index's simple page (PEP 503 HTML, with #sha256= fragments)."""
    req = urllib.request.Request(f"{index.rstrip('/')}/{normalize(name)}/", headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=60) as r:
        page = r.read().decode()
    return {fn.strip(): digest for _, digest, fn in LINK.findall(page) if installable(fn.strip(), name, version)}


def compare(folders: list[Path], locked: dict[str, dict[str, str]]) -> list[str]:
    lines = []
    wanted = {fn: digest for files in locked.values() for fn, digest in files.items()}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.name in wanted:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                same = "same as PyPI" if digest == wanted[path.name] else f"DIFFERS from PyPI ({digest[:12]}...)"
                lines.append(f"{path}: {same}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="https://pypi.org/simple", help="the index whose files are locked")
    ap.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "requirements.lock")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="folders of local wheels to compare")
    args = ap.parse_args(argv)
    locked: dict[str, dict[str, str]] = {}
    lines = ["# The serving set (requirements.txt without torch), every file hash-pinned: written by",
             "# scripts/lock_requirements.py from " + args.index + " (CPython 3.11/3.12, x86-64 Linux, and sdists).",
             "# scripts/setup.sh installs it with pip --require-hashes from that index alone; torch comes from",
             "# PyTorch's CPU index (torch==2.13.0+cpu), one index for that one name. Do not edit: rerun the script."]
    for name, version in pins(args.requirements):
        files = index_files(args.index, name, version)
        if not files:
            print(f"lock: error: {args.index} serves no installable file of {name}=={version}", file=sys.stderr)
            return 1
        locked[name] = files
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{digest} \\" for digest in sorted(set(files.values()))]
        lines[-1] = lines[-1].removesuffix(" \\")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"lock: {len(locked)} packages, {sum(len(f) for f in locked.values())} files -> {args.out}")
    for line in compare(args.compare, locked):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
