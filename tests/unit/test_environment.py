"""What the README's set-up installed: the CPU build of torch, never the CUDA one (several GB that a small
instance's disk cannot hold and that cannot run without a GPU)."""

from __future__ import annotations

import importlib.metadata as md

import torch


def test_torch_is_the_cpu_build() -> None:
    assert torch.version.cuda is None and torch.__version__.endswith("+cpu"), torch.__version__
    gpu_packages = sorted(d.metadata["Name"] for d in md.distributions()
                          if (d.metadata["Name"] or "").lower().startswith(("nvidia-", "cuda-", "triton")))
    assert gpu_packages == []
