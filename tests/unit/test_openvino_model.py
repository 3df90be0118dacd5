"""OpenVinoModel's static batch: any number of rows is run in chunks of one image's views (the last padded),
and every row's numbers are the same whatever its batch-mates, so what the build verifies on its batches is
what the server computes on one image's views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from handler.archive import OpenVinoModel, require_openvino
from testkit.harness import missing_system_tool


@pytest.fixture(scope="module", autouse=True)
def openvino() -> None:
    """OpenVINO is part of the test set-up (requirements-dev.txt): without it, CI fails and a local run skips."""
    try:
        require_openvino("onnx")
    except RuntimeError as e:
        missing_system_tool(str(e))


def small_onnx(path: Path) -> bytes:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.inference_mode():
        torch.onnx.export(net, (torch.randn(4, 3, 16, 16),), str(path), input_names=["x"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}}, dynamo=False)
    return path.read_bytes()


def test_rows_do_not_depend_on_their_batch(tmp_path: Path) -> None:
    model = OpenVinoModel(small_onnx(tmp_path / "m.onnx"), threads=1, views=4)
    x = torch.randn(11, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    whole = model(x)  # chunks of 4, 4 and 3 (+1 padding)
    assert whole.shape == (11, 3)
    for i in range(11):
        assert torch.equal(model(x[i:i + 1]), whole[i:i + 1])  # alone, padded with 3 zero rows
    assert torch.equal(model(x[3:7]), whole[3:7])  # straddling two chunks of the whole
