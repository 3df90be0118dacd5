"""The trained fixture kept between test runs on one machine, so that a contributor's second run (and every
`scripts/test.sh --quick`) does not train it again: ~2-4 minutes of every cold run on 2 cores.

Its weights are a function of what the key holds: the training and data code, the fixture's arguments (its
thread count is fixed), the package versions, and this CPU (model and flags: the kernels oneDNN picks). Anything
else changed, it trains anew. MELANOMA_TEST_CACHE names another folder, or `off` (CI runs cold: .ci/run).
Only the run's results are kept (checkpoints, summary, split), not its image cache."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

from testkit.harness import ROOT

KEPT = ("best.ckpt", "last.ckpt", "summary.json", "split.json", "progress.json")
CODE = ("train", "isic", "handler/pipeline.py", "exporter/checkpoint.py")  # the fixture's args: in the key
PACKAGES = ("torch", "resnest", "numpy", "pillow", "opencv-python-headless", "albumentations")


def folder() -> Path | None:
    """Where kept fixtures live, or None when the cache is off."""
    where = os.environ.get("MELANOMA_TEST_CACHE", "")
    if where.lower() == "off":
        return None
    base = Path(where) if where else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "melanoma-torchserve" / "tests"
    return base


def key(args: tuple[str, ...], images: int) -> str:
    h = hashlib.sha256(f"fixture-v1\0{args}\0{images}\0{platform.machine()}\0".encode())
    for name in PACKAGES:
        try:
            h.update(f"{name}={metadata.version(name)}\0".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name}=absent\0".encode())
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpu = platform.processor()
    h.update("".join(ln for ln in cpu.splitlines(keepends=True)
                     if ln.startswith(("model name", "flags")))[:20000].encode())
    for part in CODE:
        path = ROOT / part
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def restore(run: Path, name: str) -> bool:
    """Copy a kept fixture into `run`; False when there is none."""
    base = folder()
    kept = base / name if base else None
    if kept is None or not (kept / "best.ckpt").is_file():
        return False
    run.mkdir(parents=True, exist_ok=True)
    for f in KEPT:
        if (kept / f).is_file():
            shutil.copy2(kept / f, run / f)
    return True


def keep(run: Path, name: str) -> None:
    """Keep `run`'s results under `name`, whole or not at all (a private folder: it holds pickles the tests load)."""
    base = folder()
    if base is None:
        return
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = base / f".{name}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for f in KEPT:
        if (run / f).is_file():
            shutil.copy2(run / f, partial / f)
    try:
        os.replace(partial, base / name)
    except OSError:  # another run kept the same fixture first
        shutil.rmtree(partial, ignore_errors=True)
