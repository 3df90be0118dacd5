"""A folder made once per test run, whichever pytest-xdist worker asks first (tests/conftest.py's archives,
trained fixture and data sets)."""

from __future__ import annotations

import fcntl
import shutil
from collections.abc import Callable
from pathlib import Path


def once(base: Path, name: str, make: Callable[[Path], object]) -> Path:
    """base/name, made by `make` by whichever process asks first; the others wait on a lock and read the same
    files. A folder left half-made by a failed `make` is never read: the others fail at once with its error
    instead of making it again (a broken training would otherwise cost its minutes once per worker)."""
    import pytest

    path, done, failed = base / name, base / f"{name}.done", base / f"{name}.failed"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if failed.exists():
            pytest.fail(f"{name}: another worker failed to make it: {failed.read_text()}", pytrace=False)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            try:
                make(path)
            except Exception as e:
                failed.write_text(f"{type(e).__name__}: {e}"[-3000:])
                raise
            done.touch()
    return path
