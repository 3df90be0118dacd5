"""build_mar.sh --compile-cache: the key changes with anything the compiled code depends on, and the folder
must be private (it holds native code that the build and the server run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from exporter.export import ExportError, compile_cache_key, private_cache_dir


def key(module: nn.Module, size: int = 128, compiler: str = "/usr/bin/g++") -> str:
    return compile_cache_key(module, size, compiler, None)


def test_key_follows_every_weight_bit_and_the_build_inputs() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    same = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    same.load_state_dict(net.state_dict())
    assert key(net) == key(same)
    with torch.no_grad():  # one weight, one ulp
        same[0].weight[2, 3] = torch.nextafter(same[0].weight[2, 3], torch.tensor(1.0))
    assert key(net) != key(same)
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    bn.load_state_dict(net.state_dict())
    bn[1].running_var[0] += 1  # a buffer, not a parameter
    assert key(net) != key(bn)
    assert key(net) != key(net, size=160) and key(net) != key(net, compiler="/usr/bin/clang++")


def test_cache_folder_is_private(tmp_path: Path) -> None:
    made = private_cache_dir(tmp_path / "new" / "cache")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ExportError, match=r"is not private .*mode 777.*chmod 700"):
        private_cache_dir(shared)
