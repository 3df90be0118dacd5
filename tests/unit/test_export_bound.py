"""The export check: faithful exports of trained-size networks pass every time, unfaithful ones are refused."""

from __future__ import annotations

import copy
import io
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import exporter.build_mar as build_mar
from exporter.checkpoint import LoadedCheckpoint, load_checkpoint
from exporter.export import (
    RTOL,
    ExportError,
    MalignancyLogit,
    demo_checkpoint,
    export_torchscript,
    verification_images,
    verify,
)
from handler.archive import load_model
from handler.pipeline import tta_views, view_probabilities
from testkit.tolerance import MARGIN, SAME_ARCHIVE_DP
from testkit.variants import scaled, seeded_variant

pytestmark = pytest.mark.slow


def photo_logits(ckpt: LoadedCheckpoint) -> torch.Tensor:
    with torch.inference_mode():
        return MalignancyLogit(ckpt.module, 1).eval()(verification_images(128)).flatten()


@pytest.mark.parametrize("which", ["demo", "trained", "trained, head x8", "seeded, logits to +-30"])
def test_faithful_exports_pass(which: str, trained_checkpoint: Path, request: pytest.FixtureRequest) -> None:
    """The demo's and the trained fixture's exports are their archives' model.pt (built, and verified, by
    build_mar); the other two are exported here."""
    if which.startswith("seeded"):
        ckpt = LoadedCheckpoint(seeded_variant(1, 30.0), 1, "module", "seeded", [])
        logits = photo_logits(ckpt)
        assert float(logits.abs().max()) == pytest.approx(30.0, abs=0.01) and logits.min() < -10 < 10 < logits.max()
    else:
        ckpt = demo_checkpoint() if which == "demo" else load_checkpoint(trained_checkpoint)
    if which.endswith("x8"):
        ckpt = scaled(ckpt, 8)
        logits = photo_logits(ckpt)
        assert logits.min() < -15 and logits.max() > 30, "the variant must reach trained-network logit sizes"
    if which in ("demo", "trained"):
        data = zipfile.ZipFile(request.getfixturevalue(f"{which}_archive")).read("model.pt")
    else:
        data = export_torchscript(ckpt, 128)  # raises ExportError if refused
    # The worst error sits far below the bound (RTOL is 15x the measured noise floor), so the verdict cannot
    # flip from run to run (bench/verify_builds.py builds each checkpoint 10 times: docs/EXPORT.md).
    worst = verify(MalignancyLogit(ckpt.module, 1).eval(), load_model(data), 128)
    assert worst <= RTOL * (float(photo_logits(ckpt).abs().max()) + 1) / 5


def test_explainer_export_passes_on_trained_weights(trained_archive: Path) -> None:
    """The trained fixture's archive was built with explain.pt: build_mar exported it and verified it against the
    eager model (export_explainer), refusing the build otherwise; the file is there and holds both halves."""
    parts = torch.jit.load(io.BytesIO(zipfile.ZipFile(trained_archive).read("explain.pt")))
    assert hasattr(parts, "stage") and hasattr(parts, "rest")


class BakedBranch(nn.Module):
    """Data-dependent control flow: tracing records the branch the example took, for every input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if x.mean() > 0:
            return y
        return -y


def run_build(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = build_mar.main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if "error" in line.lower()]


def test_build_refuses_a_baked_in_branch(trained_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    real = build_mar.load_checkpoint

    def load(path: str, trust: bool = False) -> LoadedCheckpoint:
        ckpt = real(path, trust)
        return LoadedCheckpoint(BakedBranch(ckpt.module).eval(), 1, ckpt.form, ckpt.sha256, [])

    monkeypatch.setattr(build_mar, "load_checkpoint", load)
    rc, errors = run_build([str(trained_checkpoint), "--output-dir", str(tmp_path), "--no-explain"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith("build_mar: error: the TorchScript export differs from the eager model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change", ["head bias +0.01", "layer3 conv x1.01"])
def test_build_refuses_a_weight_changed_after_tracing(change: str, trained_checkpoint: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The traced graph holds a weight the eager model does not: a stale or edited weight."""
    real = torch.jit.trace

    def trace(module: nn.Module, example: torch.Tensor, **kw: object) -> torch.jit.ScriptModule:
        stale = copy.deepcopy(module)
        with torch.no_grad():
            if change.startswith("head"):
                stale.model.fc.bias.add_(0.01)
            else:
                stale.model.layer3[0].conv1.weight.mul_(1.01)
        return real(stale, example, **kw)

    monkeypatch.setattr(torch.jit, "trace", trace)
    rc, errors = run_build([str(trained_checkpoint), "--output-dir", str(tmp_path), "--no-explain"], capsys)
    assert rc == 2 and len(errors) == 1, errors
    assert "differs from the eager model" in errors[0] and "bound" in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_bound_is_relative_to_the_logit_and_the_network_scale() -> None:
    """A 1 % error on a large logit passes a 2 % bound; a fixed offset of 0.5 fails a 0.1 % bound."""
    eager = MalignancyLogit(demo_checkpoint().module, 1).eval()
    assert verify(eager, lambda x: eager(x) * 1.01, 128, 0.02) > 0
    with pytest.raises(ExportError, match=r"bound 0.001 x \(\|logit\| \+ "):
        verify(eager, lambda x: eager(x) + 0.5, 128, 0.001)
    with pytest.raises(ExportError, match=r"returns \(3, 2\)"):
        verify(eager, lambda x: eager(x).repeat(1, 2), 128)


def test_load_model_optimises_in_place(archive_of: Path) -> None:
    """The served fp32 model: oneDNN-optimised like torch.jit.optimize_for_inference, bit for bit, without
    its second freeze (a clone that keeps the original graph and a copy of the weights alive)."""
    data = zipfile.ZipFile(archive_of).read("model.pt")
    ours = load_model(data)
    assert "to_mkldnn" in str(ours.graph), "the optimize-for-inference pass did not run"
    with pytest.warns(DeprecationWarning):
        theirs = torch.jit.optimize_for_inference(torch.jit.load(io.BytesIO(data)).eval())
    # The same operations (their second freeze only orders a few constants differently), the same numbers.
    assert Counter(n.kind() for n in ours.graph.nodes()) == Counter(n.kind() for n in theirs.graph.nodes())
    x = verification_images(128)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))


def test_same_archive_tolerance_is_a_margin_over_the_noise_floor(archive_of: Path) -> None:
    """testkit.tolerance.SAME_ARCHIVE_DP, the bound every served-against-offline comparison uses, stays MARGIN
    times above what a change of oneDNN's reduction order does to a TTA probability: the 8 views scored one at
    a time, and on another number of threads (one, or two where this process has one core), against one batch
    (how every path scores)."""
    model = load_model(zipfile.ZipFile(archive_of).read("model.pt"))
    threads, floor = torch.get_num_threads(), 0.0
    other = 1 if threads > 1 else 2
    with torch.inference_mode():
        for image in verification_images(128):
            views = tta_views(image[None], 8).contiguous()
            batch = view_probabilities(model(views).float()[:, :1], 1, 8)
            apart = view_probabilities(torch.cat([model(v[None]) for v in views]).float()[:, :1], 1, 8)
            torch.set_num_threads(other)
            try:
                rethreaded = view_probabilities(model(views).float()[:, :1], 1, 8)
            finally:
                torch.set_num_threads(threads)
            floor = max(floor, float((apart - batch).abs()), float((rethreaded - batch).abs()))
    assert MARGIN * floor <= SAME_ARCHIVE_DP, f"noise floor {floor:.2e}: the bound no longer has its margin"
