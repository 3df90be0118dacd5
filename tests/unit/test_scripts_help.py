"""Scripts are used by strangers: `--help` prints the usage and acts on nothing (no set-up, no server
stopped, no file written or deleted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("scripts/*.sh"), ROOT / "build_mar.sh"])


def repo_state() -> str:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_does_not_act(script: str, flag: str, tmp_path: Path) -> None:
    before = repo_state()
    proc = subprocess.run(["bash", str(ROOT / script), flag], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 2, proc.stdout
    assert "setup:" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state() == before


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/token.sh", "scripts/make_cert.sh",
                                    "scripts/rotate_key.sh", "scripts/update_model.sh", "build_mar.sh"])
def test_unknown_options_are_refused(script: str, tmp_path: Path) -> None:
    """Scripts whose arguments are not handed on to another tool refuse an option they do not know, with one
    line and a non-zero exit, before doing anything (make_cert.sh once made a folder named --bogus)."""
    before = repo_state()
    proc = subprocess.run(["bash", str(ROOT / script), "--bogus"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "--bogus" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state() == before


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("bench/*.py")))
def test_bench_help_does_not_act(script: str, tmp_path: Path) -> None:
    """The bench scripts start servers and write reports: --help must do neither."""
    before = repo_state()
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state() == before
