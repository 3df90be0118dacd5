"""train --init imagenet: the published weights through torch hub's cache (TORCH_HOME), the hash prefix checked on
a file already there too, a new one-logit head; offline, one line naming the file, its address and the folder.
The weights file is made here, in the test's own hub cache: nothing is downloaded, ever (a download attempt
fails the test, and the offline case points HTTPS at a closed port on this machine)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train.imagenet as imagenet
from exporter.checkpoint import ARCHITECTURE, build_model
from testkit.harness import ROOT, free_ports
from train.synthetic import write_dataset
from train.train import initial_model


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A hub cache holding '<architecture>-<its own hash prefix>.pth': ImageNet-shaped weights (1000-class head)
    made here, named as torch hub names files, so the prefix check is the real one."""
    home = tmp_path_factory.mktemp("torch-home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    sd = build_model(1000).state_dict()
    tmp = folder / "weights.partial"
    torch.save(sd, tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    tmp.rename(folder / f"{ARCHITECTURE}-{prefix}.pth")
    return home, sd


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError(f"a download was attempted: {args[:2]}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_imagenet_start_loads_from_a_seeded_hub_cache(published: tuple[Path, dict[str, torch.Tensor]],
                                                      monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    home, sd = published
    (name,) = [p.name for p in (home / "hub" / "checkpoints").glob("*.pth")]
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(imagenet, "IMAGENET", imagenet.Weights(name, f"{imagenet.RELEASE}/{name}"))
    torch.manual_seed(42)
    model, start = initial_model("imagenet")  # train's own path
    assert start["init_weights"] == name and start["init_sha256"].startswith(name.split("-")[-1][:8])
    got = model.state_dict()
    backbone = [k for k in sd if not k.startswith("fc.")]
    assert len(backbone) > 300 and all(torch.equal(got[k], sd[k]) for k in backbone)
    assert got["fc.weight"].shape == (1, 2048) and got["fc.bias"].shape == (1,)  # a new one-logit head
    torch.manual_seed(42)
    scratch, _ = initial_model("scratch")
    assert torch.equal(scratch.state_dict()["fc.weight"], got["fc.weight"])  # the head: the seed's init
    assert not torch.equal(scratch.state_dict()["conv1.0.weight"], got["conv1.0.weight"])


def test_the_published_address_and_prefix() -> None:
    """The resnest wheel's own address is dead (wasabisys); the GitHub release holds the file."""
    w = imagenet.IMAGENET
    assert w.url == ("https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1/"
                     "resnest50_fast_4s1x64d-f74f3fc3.pth")
    assert w.file_name == "resnest50_fast_4s1x64d-f74f3fc3.pth" and w.sha256_prefix == "f74f3fc3"


def test_a_cached_file_that_is_not_the_published_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 no_download: None) -> None:
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / imagenet.IMAGENET.file_name).write_bytes(b"not the weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(imagenet.InitError) as e:
        imagenet.fetch()
    msg = str(e.value)
    assert "is not the published file" in msg and "its name promises f74f3fc3" in msg and "\n" not in msg


def test_offline_it_stops_with_one_line_naming_file_address_and_folder(tmp_path: Path) -> None:
    """python -m train as a user runs it, with no --init (ImageNet is the default), an empty hub cache, and HTTPS
    sent to a closed port on this machine: the one line a user can act on, before any image is decoded."""
    data = tmp_path / "data"
    write_dataset(data, 8, seed=0)
    (closed,) = free_ports(1)
    proxy = f"http://127.0.0.1:{closed}"
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "https_proxy": proxy, "HTTPS_PROXY": proxy,
           "no_proxy": "", "NO_PROXY": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "train", "--labels", str(data / "train.csv"), "--images",
                           str(data / "jpeg"), "--out", str(tmp_path / "run"), "--batch-size", "2", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    line = errors[0]
    assert line.startswith("train: error: --init imagenet: resnest50_fast_4s1x64d-f74f3fc3.pth is not in torch "
                           "hub's cache"), line
    assert imagenet.IMAGENET.url in line and f"put it in {folder}/" in line and "--init scratch" in line
    assert list(folder.iterdir()) == []  # nothing half-downloaded left behind
    assert not (tmp_path / "run" / "cache").exists()  # refused before the images were decoded
