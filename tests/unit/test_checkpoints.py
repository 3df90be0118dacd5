"""Every checkpoint form users have loads to the same model; every bad one fails with one clear line."""

from __future__ import annotations

import argparse
import collections
import pathlib
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from exporter.checkpoint import CheckpointError, LoadedCheckpoint, build_model, load_checkpoint
from exporter.export import (
    MalignancyLogit,
    cpu_flags_for,
    demo_checkpoint,
    logit_bound,
)
from handler.archive import load_model
from handler.pipeline import PipelineConfig, preprocess
from testkit.imaging import lesion_rgb


@pytest.fixture(scope="module")
def reference() -> nn.Module:
    return demo_checkpoint().module  # deterministic weights whose logits differ between images


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.stack([preprocess(lesion_rgb(seed=s), PipelineConfig()) for s in range(4)])


def logits(model: nn.Module, x: torch.Tensor, outputs: int = 1) -> torch.Tensor:
    with torch.inference_mode():
        return MalignancyLogit(model, outputs).eval()(x)


def assert_within_export_bound(got: torch.Tensor, ref: torch.Tensor) -> None:
    """The build's own bound (exporter.export.logit_bound): relative, as fp32 rounding through the network is."""
    bound, _ = logit_bound(ref)
    diff = (got - ref).abs()
    assert bool((diff <= bound).all()), f"max |dlogit| {float(diff.max()):.2e} at logits {ref}"
    assert float(ref.std()) > 0  # the images really score differently


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return collections.OrderedDict((prefix + k, v) for k, v in sd.items())


def lightning(sd: dict[str, torch.Tensor], prefix: str, hparams_key: str) -> dict:
    return {
        "epoch": 11,
        "global_step": 4242,
        "pytorch-lightning_version": "1.0.8" if hparams_key == "hparams" else "2.4.0",
        "state_dict": prefixed(sd, prefix),
        hparams_key: argparse.Namespace(arch="resnest50_fast_4s1x64d", lr=3e-4, image_size=128,
                                        data_dir=pathlib.PurePosixPath("/data/isic")),
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4, "params": [0, 1]}]}],
        "lr_schedulers": [{"last_epoch": 11, "_step_count": 12}],
        "callbacks": {"ModelCheckpoint{'monitor': 'val_auc'}": {"best_model_score": torch.tensor(0.8892)}},
    }


FORMS = {
    "lightning (model., hyper_parameters Namespace)": lambda sd: lightning(sd, "model.", "hyper_parameters"),
    "lightning 2020 (net., hparams Namespace)": lambda sd: lightning(sd, "net.", "hparams"),
    "bare state_dict": lambda sd: sd,
    "DataParallel module.": lambda sd: prefixed(sd, "module."),
    "Lightning + DataParallel": lambda sd: {"state_dict": prefixed(sd, "model.module."), "epoch": 1},
    "training-loop dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3},
    "fc as Sequential(Dropout, Linear)": lambda sd: {
        **{k: v for k, v in sd.items() if not k.startswith("fc.")},
        "fc.1.weight": sd["fc.weight"], "fc.1.bias": sd["fc.bias"],
    },
    "legacy without num_batches_tracked": lambda sd: {k: v for k, v in sd.items() if "num_batches" not in k},
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_loads_and_scores_identically(form: str, reference: nn.Module, batch: torch.Tensor,
                                                tmp_path: Path) -> None:
    path = tmp_path / "w.ckpt"
    torch.save(FORMS[form](reference.state_dict()), path)
    loaded = load_checkpoint(path)
    assert loaded.outputs == 1 and loaded.head == "sigmoid"
    assert torch.equal(logits(loaded.module, batch), logits(reference, batch))


def test_lightning_checkpoint_with_extra_modules_ignores_them(reference: nn.Module, tmp_path: Path) -> None:
    ckpt = lightning(reference.state_dict(), "model.", "hyper_parameters")
    ckpt["state_dict"]["criterion.pos_weight"] = torch.tensor([30.0])  # a loss buffer, not the model
    torch.save(ckpt, tmp_path / "w.ckpt")
    loaded = load_checkpoint(tmp_path / "w.ckpt")
    assert any("criterion.pos_weight" in n for n in loaded.notes)


def test_torchscript_file(checkpoint_of: LoadedCheckpoint, batch: torch.Tensor, tmp_path: Path) -> None:
    """A traced model file loads as the model it was traced from, on the demo and the trained fixture: within
    the build's relative bound (the same kernels; only TorchScript's graph passes may reorder arithmetic)."""
    model = checkpoint_of.module.eval()
    traced = torch.jit.trace(model, batch[:1])
    torch.jit.save(traced, str(tmp_path / "m.pt"))
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert "TorchScript" in loaded.form
    got, ref = logits(loaded.module, batch), logits(model, batch)
    assert_within_export_bound(got, ref)


def test_two_output_softmax_head_serves_softmax_index_1(reference: nn.Module, batch: torch.Tensor,
                                                        tmp_path: Path) -> None:
    two = build_model(2).eval()
    sd = reference.state_dict()
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(1, 2048, generator=g) * sd["fc.weight"].std() * 0.3  # a "benign" row of its own
    sd["fc.weight"] = torch.cat([w0, sd["fc.weight"]])
    sd["fc.bias"] = torch.cat([torch.tensor([0.3]), sd["fc.bias"]])
    two.load_state_dict(sd)
    torch.save({"state_dict": prefixed(two.state_dict(), "model.")}, tmp_path / "two.ckpt")
    loaded = load_checkpoint(tmp_path / "two.ckpt")
    assert loaded.outputs == 2 and loaded.head == "softmax"
    with torch.inference_mode():
        p_softmax = torch.softmax(two(batch), dim=1)[:, 1]
        p_ours = torch.sigmoid(logits(loaded.module, batch, 2))[:, 0]
    assert float(p_softmax.std()) > 0.01
    torch.testing.assert_close(p_ours, p_softmax, atol=1e-6, rtol=0)


def test_pickled_module_needs_trust(reference: nn.Module, batch: torch.Tensor, tmp_path: Path) -> None:
    torch.save(reference, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "whole.pt")
    with pytest.warns(UserWarning, match="arbitrary code"):
        loaded = load_checkpoint(tmp_path / "whole.pt", trust=True)
    assert loaded.form == "pickled module"
    assert torch.equal(logits(loaded.module, batch), logits(reference, batch))


class Exploit:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Exploit(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "evil.ckpt")
    assert "--trust-checkpoint" in str(e.value) and "pathlib" in str(e.value)
    assert not marker.exists()


def _bad(tmp_path: Path, reference: nn.Module) -> dict[str, tuple[Path, str]]:
    sd = reference.state_dict()
    cases: dict[str, tuple[object, str]] = {
        "not a checkpoint (text)": (b"epoch,loss\n1,0.3\n", "not a PyTorch checkpoint"),
        "random bytes": (bytes(range(256)) * 40, "not a PyTorch checkpoint"),
        "empty file": (b"", "empty"),
        "dict without weights": ({"epoch": 3, "lr": 0.1}, "no state_dict"),
        "list": ([1, 2, 3], "not a model checkpoint"),
        "wrong architecture": ({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1, 2048)},
                               "missing key"),
        "wrong head size": ({**sd, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)},
                            "(1000, 2048)"),
        "NaN weights": ({**sd, "layer2.0.conv1.weight": sd["layer2.0.conv1.weight"] * float("nan")},
                        "NaN/Inf"),
        "wrong shape": ({**sd, "layer1.0.conv2.conv.weight": torch.zeros(3, 3)}, "wrong shape"),
    }
    out = {}
    for name, (content, words) in cases.items():
        p = tmp_path / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".ckpt")
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            torch.save(content, p)
        out[name] = (p, words)
    return out


def test_bad_checkpoints_fail_with_one_clear_line(reference: nn.Module, tmp_path: Path) -> None:
    for name, (path, words) in _bad(tmp_path, reference).items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert words in msg, f"{name}: {msg}"
        assert "\n" not in msg, name
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


def test_export_matches_eager_for_other_batch_sizes(checkpoint_of: LoadedCheckpoint, archive_of: Path) -> None:
    """A batch of 5 (the export verifies 3 and 8), on noise, on the demo and the trained fixture: the model.pt
    their archives ship, within the bound the build enforces, RTOL x (|logit| + the typical |logit|), which is
    relative because fp32 rounding through the network is (a fixed atol failed ordinary trained logits before)."""
    ckpt = checkpoint_of
    ts = load_model(zipfile.ZipFile(archive_of).read("model.pt"))
    x = torch.randn(5, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = ts(x)[:, :1]
    ref = logits(ckpt.module, x, ckpt.outputs)
    assert_within_export_bound(got, ref)


def test_inductor_arch_flags_become_cpuinfo_flags() -> None:
    flags = "-mavx512f -mavx512dq -mavx512vl -mavx512bw -mfma -mavx512vnni -mavx512vl -mavx512bf16 -mamx-tile"
    assert cpu_flags_for(flags) == ["amx_tile", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512dq",
                                    "avx512f", "avx512vl", "fma"]
    assert cpu_flags_for("-mavx2 -mfma -march=x86-64") == ["avx2", "fma"]
    assert cpu_flags_for("") == []
