"""The published ImageNet weights of resnest50_fast_4s1x64d, as the start of a training run (train --init imagenet).

The resnest 0.0.5 wheel on PyPI points its `pretrained=True` at its original storage, dead since 2021
(zhanghang1989/ResNeSt#152, #153); upstream moved the files to the repository's GitHub release `weights_step1`.
The file goes through torch hub's cache (TORCH_HOME, default ~/.cache/torch: hub/checkpoints/), downloaded by
torch.hub.download_url_to_file, which checks the SHA-256 prefix the file name carries; a file already in the cache
is checked here too (torch hub trusts whatever sits there). Offline, or the address unreachable, it stops with
one line naming the file, its address and the folder to put it in. Loaded with weights_only=True.
"""

from __future__ import annotations

import hashlib
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from exporter.checkpoint import ARCHITECTURE, build_model


class InitError(Exception):
    """The ImageNet start cannot be had; the message is one line saying what to do."""


@dataclass(frozen=True)
class Weights:
    file_name: str  # "<architecture>-<first 8 hex of its SHA-256>.pth", torch hub's convention
    url: str

    @property
    def sha256_prefix(self) -> str:
        m = re.search(r"-([a-f0-9]{8,})\.", self.file_name)
        if m is None:
            raise ValueError(f"{self.file_name} carries no hash prefix")
        return m.group(1)


RELEASE = "https://github.com/zhanghang1989/ResNeSt/releases/download/weights_step1"
IMAGENET = Weights(f"{ARCHITECTURE}-f74f3fc3.pth", f"{RELEASE}/{ARCHITECTURE}-f74f3fc3.pth")
HEAD = ("fc.weight", "fc.bias")  # ImageNet's 1000-class head: replaced by a new one-logit head
NETWORK_TIMEOUT_S = 30  # a connection or a read that stalls this long counts as unreachable


def hub_folder() -> Path:
    """Where torch hub keeps downloaded weights (TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(weights: Weights | None = None, progress: bool = False) -> tuple[Path, str]:
    """The weights file in torch hub's cache, downloaded there if absent; (path, its SHA-256). InitError, one
    line, when it is neither there nor to be had, or is not the published file. `weights`: IMAGENET."""
    weights = weights or IMAGENET
    folder = hub_folder()
    path = folder / weights.file_name
    by_hand = (f"download it where the network allows and put it in {folder}/ (torch hub's cache: TORCH_HOME), "
               "or train with --init scratch")
    if not path.is_file():
        # torch hub opens the address with no timeout: behind a firewall that drops packets, "offline" would be a
        # silent wait of minutes. A stall of NETWORK_TIMEOUT_S is taken as unreachable.
        previous = socket.getdefaulttimeout()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            print(f"train: downloading the ImageNet weights {weights.url} into {folder}/", file=sys.stderr)
            socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
            torch.hub.download_url_to_file(weights.url, str(path), weights.sha256_prefix, progress=progress)
        except RuntimeError as e:  # torch hub's hash check: the download is deleted, not kept
            raise InitError(f"--init imagenet: {weights.url} did not download as the published file "
                            f"({str(e).strip().splitlines()[0][:160]}); {by_hand}") from None
        except Exception as e:  # offline, refused, DNS, proxy, HTTP error, a folder it may not write: one line
            reason = str(getattr(e, "reason", "") or e).strip().splitlines()
            raise InitError(f"--init imagenet: {weights.file_name} is not in torch hub's cache and could not be "
                            f"downloaded from {weights.url} ({type(e).__name__}: {reason[0][:160] if reason else ''}); "
                            f"{by_hand}") from None
        finally:
            socket.setdefaulttimeout(previous)
    digest = _sha256(path)
    if not digest.startswith(weights.sha256_prefix):
        raise InitError(f"--init imagenet: {path} is not the published file (its SHA-256 starts {digest[:8]}, its "
                        f"name promises {weights.sha256_prefix}): delete it and fetch {weights.url} again")
    return path, digest


def imagenet_model(weights: Weights | None = None, progress: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """resnest50_fast_4s1x64d with the ImageNet weights (`weights`: IMAGENET) and a new one-logit head (torch's
    default init, from the current seed); returns the module and what to record about its start (file, address,
    SHA-256)."""
    weights = weights or IMAGENET
    path, digest = fetch(weights, progress)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InitError(f"--init imagenet: {path} does not load as weights ({str(e).splitlines()[0][:160]}); "
                        f"delete it and fetch {weights.url} again") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    model = build_model(1)
    ref = model.state_dict()
    have = set(sd) if isinstance(sd, dict) else set()
    # BatchNorm's step counters are absent from files saved before torch 0.4.1; they play no part in eval or in
    # training with a momentum.
    want = {k for k in ref if k not in HEAD and (k in have or not k.endswith("num_batches_tracked"))}
    if not isinstance(sd, dict) or want - have or have - want - set(HEAD):
        missing, unexpected = sorted(want - have), sorted(have - want - set(HEAD))
        raise InitError(f"--init imagenet: {path} is not the ImageNet weights of {ARCHITECTURE} ({len(missing)} "
                        f"missing key(s) {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]})")
    wrong = [k for k in sorted(want) if tuple(sd[k].shape) != tuple(ref[k].shape)]
    if wrong:
        raise InitError(f"--init imagenet: {path}: {wrong[0]} is {tuple(sd[wrong[0]].shape)}, {ARCHITECTURE} needs "
                        f"{tuple(ref[wrong[0]].shape)}")
    model.load_state_dict({k: sd[k].float() for k in want}, strict=False)  # the head keeps its fresh init
    return model, {"init_weights": weights.file_name, "init_url": weights.url, "init_sha256": digest}
