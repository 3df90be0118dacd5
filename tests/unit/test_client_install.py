"""`pip install .` is a client-only install: client/ and isic/ with requests and numpy, two console scripts,
no torch. Built and installed offline (no index, no build isolation) into a fresh virtual environment that
sees requests and numpy but not torch, TorchServe or the server's packages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy
import pytest
import requests

from testkit.harness import free_ports

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")  # a copy: building in the checkout would leave build/ and egg-info
    shutil.copy(ROOT / "pyproject.toml", src)
    for pkg in ("client", "isic"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "--quiet", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("melanoma_client-*.whl")
    return wheel


def test_wheel_holds_the_client_alone(client_wheel: Path) -> None:
    with zipfile.ZipFile(client_wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"client", "isic"}
    requires = sorted(ln.split(":", 1)[1].strip() for ln in meta.splitlines() if ln.startswith("Requires-Dist:"))
    base = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0] for r in base] == ["numpy", "requests"]
    # scikit-learn and matplotlib only for the evaluation extra: a plain install stays small
    extra = sorted(r.split(">")[0] for r in requires if r.endswith('extra == "evaluation"'))
    assert extra == ["matplotlib", "scikit-learn"] and len(requires) == 4, requires
    assert "melanoma-predict = client.predict:cli" in scripts and "melanoma-evaluate = client.evaluate:cli" in scripts


def test_installed_client_runs_without_torch(client_wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                           "--quiet", str(client_wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # requests (and what it needs) and numpy, nothing else from the development environment
    deps = tmp_path / "deps"
    deps.mkdir()
    import certifi
    import charset_normalizer
    import idna
    import urllib3

    for mod in (requests, numpy, urllib3, idna, certifi, charset_normalizer):
        pkg = Path(mod.__file__).parent
        (deps / pkg.name).symlink_to(pkg)
        if (pkg.parent / f"{pkg.name}.libs").is_dir():
            (deps / f"{pkg.name}.libs").symlink_to(pkg.parent / f"{pkg.name}.libs")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(deps), "HOME": str(tmp_path)}
    run = lambda *a: subprocess.run([str(env_dir / "bin" / a[0]), *a[1:]], capture_output=True, text=True,  # noqa: E731
                                    env=env, cwd=tmp_path, timeout=120)
    check = subprocess.run([str(py), "-c", "import importlib.util as u; print([m for m in ('torch', 'ts', 'handler', "
                            "'exporter') if u.find_spec(m)])"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert check.stdout.strip() == "[]", check.stdout + check.stderr
    assert Path(site, "client", "predict.py").is_file()

    for script in ("melanoma-predict", "melanoma-evaluate"):
        helped = run(script, "--help")
        assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr
    # without the evaluation extra, evaluating is one line saying how to add it
    bare = run("melanoma-evaluate", "--labels", "train.csv", "--images", ".", "--url", "http://127.0.0.1:9")
    assert bare.returncode == 2 and len(bare.stderr.strip().splitlines()) == 1, bare.stderr
    assert "pip install 'melanoma-client[evaluation]'" in bare.stderr
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\xff\xd8\xff\xe0 not really")
    offline = run("melanoma-predict", str(image), "--offline", "model.mar")
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert "offline mode needs the server's packages (handler is not installed)" in offline.stderr
    # the online path imports and runs: a server that is not there is one line, exit 1
    (dead,) = free_ports(1)
    down = run("melanoma-predict", str(image), "--url", f"http://127.0.0.1:{dead}", "--token", "k", "--retries", "0")
    assert down.returncode == 1 and "Traceback" not in down.stderr, down.stderr
