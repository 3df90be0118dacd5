"""build_mar.sh end to end: real archives, real failures, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from exporter.checkpoint import build_model, load_checkpoint
from exporter.export import demo_checkpoint
from handler.archive import load_archive
from handler.explain import explain_images, load_explainer
from handler.pipeline import InputError, PipelineConfig, Score, load_tensor, tta_views
from testkit.archives import variant
from testkit.harness import ROOT, build_in_process, run_build, start_server, stop_server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP
from train.synthetic import lesion

pytestmark = [pytest.mark.integration, pytest.mark.quick]  # part of scripts/test.sh --quick


def test_demo_archive_contents(demo_archive: Path) -> None:
    with zipfile.ZipFile(demo_archive) as zf:
        names = set(zf.namelist())
        meta = json.loads(zf.read("metadata.json"))
        cfg = yaml.safe_load(zf.read("model-config.yaml"))
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
    assert {"model.pt", "explain.pt", "metadata.json", "model-config.yaml", "melanoma_handler.py",
            "handler/pipeline.py", "handler/explain.py"} <= names
    assert meta["explain"] == {"file": "explain.pt", "method": "layer-cam", "layer": "layer3"}
    # the model's second output (pooled stages for the input checks); no validation set: no OOD fit, no ood.npz
    assert meta["checks"]["features"] == {"layer2": 512, "layer3": 1024, "layer4": 2048}
    assert meta["checks"]["ood"] is None and "ood.npz" not in names
    assert meta["demo"] is True and meta["architecture"] == "resnest50_fast_4s1x64d" and meta["head"] == "sigmoid"
    assert len(meta["weights_sha256"]) == 64 and meta["versions"]["torch"].startswith("2.13.0")
    assert {"created_at", "source_file", "model_file", "model_sha256"} <= set(meta)
    assert PipelineConfig.from_mapping(cfg["handler"], ignore=("threads",)) == PipelineConfig()
    assert {"batchSize", "maxBatchDelay", "minWorkers", "maxWorkers", "responseTimeout"} <= set(cfg)
    assert manifest["model"]["handler"] == "melanoma_handler.py"
    # the handler package ships whole: every module in handler/, none listed by hand
    packed = {n for n in names if n.startswith("handler/") and n.endswith(".py")}
    assert packed == {f"handler/{f.name}" for f in (ROOT / "handler").glob("*.py")}


@pytest.mark.slow  # full depth only: not a main path, and ~30-60 s here
def test_a_handler_module_added_later_is_packed_and_served(tmp_path: Path) -> None:
    """No hand-kept file list: a copy of the build's inputs gets a new module in handler/, imported by the adapter
    as any new helper would be; its archive holds it, and real TorchServe loads and serves it."""
    src = tmp_path / "repo"
    for name in ("exporter", "handler", "isic"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "build_mar.sh", src / "build_mar.sh")
    (src / ".venv").symlink_to(ROOT / ".venv")
    (src / "handler" / "added_later.py").write_text('TAG = "added after any list would have been written"\n')
    adapter = src / "handler" / "melanoma_handler.py"
    anchor = "from handler import pipeline  # noqa: E402\n"
    assert anchor in adapter.read_text()
    adapter.write_text(adapter.read_text().replace(anchor, anchor + "from handler.added_later import TAG  # noqa\n"))
    store = tmp_path / "model_store"
    store.mkdir()
    proc = subprocess.run([str(src / "build_mar.sh"), "--no-explain", "--output-dir", str(store)], cwd=src,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(store / "melanoma.mar") as zf:
        assert "handler/added_later.py" in zf.namelist()
    srv = start_server(store, tmp_path / "ts")
    try:
        data = encode(lesion_rgb(seed=5))
        r = srv.predict(data)
        assert r.status_code == 200, r.text
        offline = load_archive(store / "melanoma.mar").score(data)["probability"]
        assert abs(r.json()["probability"] - offline) <= SAME_ARCHIVE_DP
    finally:
        stop_server(srv)


def test_demo_build_is_deterministic(demo_archive: Path) -> None:
    meta = json.loads(zipfile.ZipFile(demo_archive).read("metadata.json"))
    assert demo_checkpoint().sha256 == meta["weights_sha256"]


def eager_probability(model: torch.nn.Module, data: bytes, cfg: PipelineConfig, softmax: bool) -> float:
    """Independent reference: the eager model, the training transform, explicit per-view loop."""
    x = tta_views(load_tensor(data, cfg)[None], cfg.tta_views)
    ps = []
    with torch.inference_mode():
        for v in x:
            out = model(v[None])
            ps.append(float(torch.softmax(out, 1)[0, 1] if softmax else torch.sigmoid(out)[0, 0]))
    return sum(ps) / len(ps)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["demo", "trained"])
def test_two_output_checkpoint_archive_scores_equal_the_eager_model(weights: str, tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    """Acceptance: ./build_mar.sh some.ckpt scores in-process like the eager model (|dp| <= 1e-5: the export's
    logit noise, <= 3.3e-5 x (|logit| + 1), moves a probability by at most a quarter of that), for a Lightning
    checkpoint with a 2-output softmax head built from the demo's and the trained fixture's weights. A 1-output
    sigmoid Lightning checkpoint is trained_archive itself (test_trained_archive_equals_its_eager_model). The
    demo's also carries --threshold, --version and explain.pt (the trained one is built --no-explain)."""
    ref = demo_checkpoint().module if weights == "demo" else load_checkpoint(
        request.getfixturevalue("trained_checkpoint")).module
    model = build_model(2).eval()
    sd = ref.state_dict()
    sd["fc.weight"] = torch.cat([torch.zeros(1, 2048), sd["fc.weight"]])
    sd["fc.bias"] = torch.cat([torch.tensor([0.25]), sd["fc.bias"]])
    model.load_state_dict(sd)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
            "hyper_parameters": {"lr": 1e-4}}
    torch.save(ckpt, tmp_path / "epoch=3-val_auc=0.89.ckpt")
    store = tmp_path / "model_store"
    store.mkdir()
    extra = ("--threshold", "0.3", "--version", "2.1") if weights == "demo" else ("--no-explain",)
    proc = run_build(str(tmp_path / "epoch=3-val_auc=0.89.ckpt"), *extra, output_dir=store)
    assert "Lightning checkpoint" in proc.stderr
    archive = load_archive(store / "melanoma.mar")
    assert archive.metadata.demo is False and archive.metadata.head == "softmax"
    assert archive.metadata.version == ("2.1" if weights == "demo" else "1.0")
    cfg = archive.cfg
    probs = []
    for seed in range(4):
        data = encode(lesion_rgb(seed=seed), "JPEG")
        res = archive.score(data)
        expected = eager_probability(model, data, cfg, softmax=True)
        assert abs(res["probability"] - expected) <= 1e-5
        assert res["threshold"] == (0.3 if weights == "demo" else 0.5) and "warning" not in res
        probs.append(res["probability"])
    assert max(probs) - min(probs) > 1e-3  # the images really score differently
    if weights == "demo":  # explain.pt is the same model, softmax head included: explain_images checks its own
        data = encode(lesion_rgb(seed=0), "JPEG")  # logits against the probability it is given, and refuses another
        explainer = load_explainer(archive)
        body = explain_images(explainer, [data], [Score(probs[0], probs[0])], archive.metadata, [False])[0]
        assert body["explanation"]["shape"] == [192, 256]
        with pytest.raises(RuntimeError, match="explain.pt disagrees with model.pt"):
            explain_images(explainer, [data], [Score(probs[0] + 0.01, probs[0] + 0.01)], archive.metadata, [False])


def test_trained_archive_equals_its_eager_model(trained_checkpoint: Path, trained_archive: Path) -> None:
    model = load_checkpoint(trained_checkpoint).module
    archive = load_archive(trained_archive)
    probs = []
    for seed in range(4):
        data = encode(lesion(seed % 2, np.random.default_rng(seed)), "JPEG")
        p = archive.score(data)["probability"]
        assert abs(p - eager_probability(model, data, archive.cfg, softmax=False)) <= 1e-5
        probs.append(p)
    assert max(probs) - min(probs) > 0.5  # the task's two classes really score apart


LIMITS = ("--min-side", "64", "--min-sharpness", "1e9", "--max-clipped", "0.5", "--median-luminance", "10", "250")


def test_tta_views_and_limits_reach_the_archive(tmp_path: Path) -> None:
    """--tta-views 1, --no-explain and every input-check limit, built (in-process): the archive serves one view,
    records and scores with those limits, not the defaults, and has no explain.pt."""
    proc = build_in_process("--tta-views", "1", "--no-explain", *LIMITS, output_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr
    archive = load_archive(tmp_path / "melanoma.mar")
    assert archive.cfg.tta_views == 1
    data = encode(lesion_rgb(seed=1), "JPEG")
    checks = archive.score(data)["checks"]
    assert archive.metadata.checks["limits"] == {"min_side": 64, "min_sharpness": 1e9, "max_clipped": 0.5,
                                                 "min_median": 10.0, "max_median": 250.0}
    assert checks["blur"]["flagged"] and checks["blur"]["min_sharpness"] == 1e9  # no image is that sharp
    assert checks["exposure"]["max_clipped"] == 0.5 and checks["exposure"]["median_range"] == [10.0, 250.0]
    assert checks["resolution"]["min_side"] == 64 and not checks["passed"]
    assert archive.metadata.explain is None and not archive.has_member("explain.pt")
    assert (tmp_path / "melanoma.mar").stat().st_size < 150 * 2**20
    with pytest.raises(InputError) as e:
        load_explainer(archive)
    assert e.value.status == 501


def test_explanations_follow_the_archives_views(demo_archive: Path, tmp_path: Path) -> None:
    """The views travel in model-config.yaml (the build writes it: the test above); an archive whose config says 4
    averages its heatmaps over 4 views (the demo archive with its config rewritten, not rebuilt)."""
    four = load_archive(variant(demo_archive, tmp_path, handler={"tta_views": 4}))
    assert four.cfg.tta_views == 4 and four.metadata.checks["limits"]["min_sharpness"] == 5.0
    data = encode(lesion_rgb(seed=1), "JPEG")
    assert not four.score(data)["checks"]["blur"]["flagged"]
    body = explain_images(load_explainer(four), [data], [four.scorer.score_bytes(data)], four.metadata, [False])[0]
    assert body["explanation"]["views_averaged"] == 4 and body["tta_views"] == 4


@pytest.mark.parametrize("args,words", [
    (("--min-side", "0"), "min_side must be a whole number of pixels >= 1"),
    (("--min-sharpness", "-1"), "min_sharpness must be >= 0"),
    (("--max-clipped", "0"), "max_clipped must be in (0, 1]"),
    (("--median-luminance", "200", "100"), "0 <= low < high <= 255"),
])
def test_bad_input_check_limits_fail_fast(args: tuple[str, ...], words: str, tmp_path: Path) -> None:
    proc = build_in_process(*args, output_dir=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("build_mar: error: input-check limits:") and words in last, last
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_force(demo_archive: Path) -> None:
    before = demo_archive.stat().st_mtime_ns
    proc = run_build(output_dir=demo_archive.parent, check=False)
    assert proc.returncode != 0 and "--force" in proc.stderr
    assert demo_archive.stat().st_mtime_ns == before


def bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str, tuple[str, ...]]]:
    sd = build_model(1).state_dict()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    cases = {
        "missing": (tmp_path / "nope.ckpt", None, "no such file"),
        "not a checkpoint": (tmp_path / "notes.ckpt", b"just some text\n", "not a PyTorch checkpoint"),
        "wrong architecture": (tmp_path / "arch.ckpt", {"conv1.weight": torch.zeros(64, 3, 7, 7)}, "missing key"),
        "wrong head": (tmp_path / "head.ckpt", {**sd, "fc.weight": torch.zeros(5, 2048), "fc.bias": torch.zeros(5)},
                       "(5, 2048)"),
        "NaN": (tmp_path / "nan.ckpt", {**sd, "fc.bias": torch.tensor([float("nan")])}, "NaN/Inf"),
        "needs code": (tmp_path / "evil.ckpt", {"state_dict": sd, "x": Evil()}, "--trust-checkpoint"),
    }
    out = {}
    for name, (path, content, words) in cases.items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        out[name] = (path, words, ())
    return out


def test_bad_checkpoints_fail_fast_and_write_nothing(tmp_path: Path) -> None:
    """In-process (build_mar's own main) but for the pickle that needs code, which goes through ./build_mar.sh
    as a user runs it: the shell entry point's exit status and its one line."""
    store = tmp_path / "model_store"
    store.mkdir()
    (store / "keep.txt").write_text("untouched")
    for name, (path, words, _) in bad_checkpoints(tmp_path).items():
        build = partial(run_build, check=False) if name == "needs code" else build_in_process
        proc = build(str(path), output_dir=store)
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
        assert proc.returncode != 0, name
        assert len(errors) == 1 and errors[0].startswith("build_mar: error:") and words in errors[0], \
            f"{name}: {proc.stderr}"
        assert "Traceback" not in proc.stderr, name
        assert sorted(p.name for p in store.iterdir()) == ["keep.txt"], name


def test_bad_options_fail_fast(tmp_path: Path) -> None:
    proc = build_in_process("--threshold", "2", output_dir=tmp_path)
    assert proc.returncode != 0 and "threshold" in proc.stderr and not list(tmp_path.iterdir())
    proc = build_in_process("--tta-views", "3", output_dir=tmp_path)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = build_in_process(output_dir=tmp_path / "absent")
    assert proc.returncode != 0 and "does not exist" in proc.stderr


@pytest.mark.slow  # full depth only: not a main path, and ~30-60 s here
def test_two_builds_at_once_do_not_collide(tmp_path: Path) -> None:
    """torch-model-archiver stages in $TMPDIR/<model name>: each build gives it its own folder, so a user's
    build and a test's (or two tests') can run at the same time. One thread each: two builds of two OpenMP
    threads on two cores spin against each other (55 s against 22 s here, 182 s in a CI run)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = []
    for out in outs:
        out.mkdir()
        procs.append(subprocess.Popen([str(ROOT / "build_mar.sh"), "--no-explain", "--output-dir", str(out)],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    for out in outs:
        assert load_archive(out / "melanoma.mar").metadata.demo is True
