"""The layering rules in pyproject.toml ([tool.ruff.lint] TID) fail on a deliberate violation of each
boundary, and let the allowed imports through. Each probe is linted from stdin as if it sat at that path:
nothing is written to the tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"


def lint(path: str, source: str) -> str:
    proc = subprocess.run([str(RUFF), "check", "--no-cache", "--select", "TID", "--stdin-filename", path, "-"],
                          input=source, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout if proc.returncode else ""


BROKEN = [
    ("handler/pipeline.py", "import ts\n", "TID251"),
    ("handler/explain.py", "from ts.torch_handler.base_handler import BaseHandler\n", "TID251"),
    ("exporter/export.py", "from ts.context import Context\n", "TID251"),
    ("bench/bench.py", "from tests.unit import test_pipeline\n", "TID251"),
    ("testkit/harness.py", "import conftest\n", "TID251"),
    ("client/predict.py", "import torch\n", "TID253"),
    ("client/tsclient.py", "from handler.pipeline import load_archive\n", "TID253"),
    ("client/app.py", "from exporter.export import export_torchscript\n", "TID253"),
]
ALLOWED = [
    ("handler/melanoma_handler.py", "from ts.torch_handler.base_handler import BaseHandler\n"),
    ("client/evaluate.py", "def offline() -> None:\n    import torch\n\n    del torch\n"),
    ("exporter/export.py", "import torch\n"),
    ("bench/bench.py", "from testkit.harness import run_build\n"),
]


@pytest.mark.parametrize(("path", "source", "rule"), BROKEN, ids=[f"{p}: {s.strip()}" for p, s, _ in BROKEN])
def test_each_boundary_fails_the_lint(path: str, source: str, rule: str) -> None:
    assert rule in lint(path, source)


@pytest.mark.parametrize(("path", "source"), ALLOWED, ids=[p for p, _ in ALLOWED])
def test_allowed_imports_pass(path: str, source: str) -> None:
    assert lint(path, source) == ""


def check_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py"), str(root)],
                          capture_output=True, text=True, timeout=60)


def test_no_import_cycle_between_packages() -> None:
    proc = check_imports(ROOT)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_a_planted_cycle_fails_with_one_line(tmp_path: Path) -> None:
    """exporter builds on handler; a lazy import back from handler (the shape of the cycle that once hid
    behind sys.path edits) is caught, with where each edge is."""
    for pkg, source in (("handler", "def f():\n    from exporter import export\n"),
                        ("exporter", "from handler import pipeline\n"), ("client", "import isic\n")):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "m.py").write_text(source)
    proc = check_imports(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "check_imports: error: import cycle handler -> exporter -> handler (handler/m.py:2, exporter/m.py:1)"]
