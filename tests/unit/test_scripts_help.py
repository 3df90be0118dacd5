"""Scripts are used by strangers: `--help` prints the usage and acts on nothing (no set-up, no server
stopped, no file written or deleted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("scripts/*.sh"), ROOT / "build_mar.sh"])
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's tracked files (its .venv linked in) that nothing but these tests touches: in the
    checkout itself, another xdist worker's files (results, caches) would change its state mid-test."""
    copy = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    return copy


def repo_state(repo: Path) -> list[tuple[str, int, int]]:
    """Every file and folder in the copy (not through .venv), with its size and modification time."""
    return sorted((str(p.relative_to(repo)), p.lstat().st_size, p.lstat().st_mtime_ns)
                  for p in repo.rglob("*") if p.parts[len(repo.parts)] != ".venv")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_does_not_act(script: str, flag: str, repo: Path, tmp_path: Path) -> None:
    before = repo_state(repo)
    proc = subprocess.run(["bash", str(repo / script), flag], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) >= 2, proc.stdout
    assert "setup:" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state(repo) == before


@pytest.mark.parametrize("script", ["scripts/setup.sh", "scripts/token.sh", "scripts/make_cert.sh",
                                    "scripts/rotate_key.sh", "scripts/update_model.sh", "build_mar.sh"])
def test_unknown_options_are_refused(script: str, repo: Path, tmp_path: Path) -> None:
    """Scripts whose arguments are not handed on to another tool refuse an option they do not know, with one
    line and a non-zero exit, before doing anything (make_cert.sh once made a folder named --bogus)."""
    before = repo_state(repo)
    proc = subprocess.run(["bash", str(repo / script), "--bogus"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=ENV)
    assert proc.returncode != 0 and "--bogus" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state(repo) == before


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("bench/*.py")))
def test_bench_help_does_not_act(script: str, repo: Path, tmp_path: Path) -> None:
    """The bench scripts start servers and write reports: --help must do neither."""
    before = repo_state(repo)
    proc = subprocess.run([sys.executable, str(repo / script), "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**ENV, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == [] and repo_state(repo) == before
