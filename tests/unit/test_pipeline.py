"""The pipeline module, checked against independent computations (cv2/numpy), no server."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from handler.archive import ArchiveError, ArchiveMetadata, check_runtime, result
from handler.pipeline import (
    InputError,
    PipelineConfig,
    Score,
    Scorer,
    decode_image,
    preprocess,
    tta_views,
    view_probabilities,
)
from testkit.imaging import encode, heic_with_orientation, jpeg_with_orientation, lesion_rgb, png_header_only, variants

CFG = PipelineConfig()
FULL = PipelineConfig(reduced_decode=False)
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def reference_preprocess(rgb: np.ndarray, size: int = 128) -> np.ndarray:
    """The training transform written out by hand: INTER_AREA when shrinking, else INTER_LINEAR."""
    shrink = rgb.shape[0] > size or rgb.shape[1] > size
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    resized = cv2.resize(rgb, (size, size), interpolation=interp).astype(np.float32)
    return ((resized / 255.0 - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("shape", [(240, 320), (128, 128), (60, 90), (1, 1)])
def test_preprocess_matches_the_training_transform(shape: tuple[int, int]) -> None:
    rgb = lesion_rgb(*shape, seed=1) if min(shape) > 8 else np.full((*shape, 3), 77, np.uint8)
    got = preprocess(rgb, CFG)
    assert got.dtype == torch.float32 and tuple(got.shape) == (3, 128, 128)
    np.testing.assert_allclose(got.numpy(), reference_preprocess(rgb), atol=1e-5)


def test_full_decode_is_lossless_for_png() -> None:
    rgb = lesion_rgb(seed=2)
    np.testing.assert_array_equal(decode_image(encode(rgb, "PNG"), FULL), rgb)


@pytest.mark.parametrize("orientation,undo", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation: int, undo) -> None:
    rgb = lesion_rgb(seed=3)
    upright = decode_image(encode(rgb, "JPEG"), FULL)
    rotated = decode_image(jpeg_with_orientation(rgb, orientation), FULL)
    expected = undo(upright)
    assert rotated.shape == expected.shape
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 1.0


@pytest.mark.parametrize("orientation,undo", [(3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)),
                                              (8, lambda a: np.rot90(a, 1))])
def test_heic_decodes_like_the_photo_and_turns_like_jpeg(orientation: int, undo) -> None:
    """Phones save HEIC: decoded to the same pixels as the PNG (within HEVC's loss at quality 90), and its
    EXIF orientation applied once, like a JPEG's."""
    rgb = lesion_rgb(seed=3)
    upright = decode_image(encode(rgb, "HEIF"), FULL)
    assert upright.shape == rgb.shape and np.abs(upright.astype(int) - rgb.astype(int)).mean() < 3.0
    rotated = decode_image(heic_with_orientation(rgb, orientation), FULL)
    expected = undo(decode_image(jpeg_with_orientation(rgb, 1), FULL))
    assert rotated.shape == expected.shape
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 3.0
    wrong = np.rot90(expected, 2)  # the comparison can tell orientations apart
    assert wrong.shape != rotated.shape or np.abs(rotated.astype(int) - wrong.astype(int)).mean() > 10


@pytest.mark.parametrize("name", list(variants()))
def test_every_format_and_mode_decodes_to_rgb(name: str) -> None:
    rgb = decode_image(variants()[name], CFG)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


def test_modes_convert_as_documented() -> None:
    rgb = lesion_rgb(seed=4)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    out = decode_image(encode(gray, "PNG"), FULL)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))
    # RGBA: alpha dropped, colour kept (as cv2.imread(IMREAD_COLOR) does in training code)
    rgba = np.dstack([rgb, np.zeros(rgb.shape[:2], np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), FULL), rgb)
    # 16-bit grayscale scales the full range, instead of clipping everything above 255 to white
    g16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out16 = decode_image(encode(Image.fromarray(g16), "PNG"), FULL)
    np.testing.assert_array_equal(out16[..., 0], np.rint(g16 / 257).astype(np.uint8))
    # CMYK JPEG converts to RGB of the same size
    cmyk = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), FULL)
    assert cmyk.shape == rgb.shape


def test_gif_and_tiff_use_the_first_frame() -> None:
    a, b = lesion_rgb(seed=5), lesion_rgb(seed=6)
    frames = [Image.fromarray(a), Image.fromarray(b)]
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(decode_image(tiff, FULL), a)
    gif = encode(frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]])
    np.testing.assert_array_equal(decode_image(gif, FULL), np.asarray(frames[0].convert("P").convert("RGB")))


def test_reduced_jpeg_decode_stays_within_tolerance_on_a_24mp_photo() -> None:
    small = lesion_rgb(400, 600, seed=7)
    big = cv2.resize(small, (6000, 4000), interpolation=cv2.INTER_CUBIC)  # a smooth 24 MP photo
    data = encode(big, "JPEG", quality=90)
    reduced = decode_image(data, CFG)
    assert min(reduced.shape[:2]) >= 2 * CFG.image_size and reduced.shape[:2] == (500, 750)
    delta = (preprocess(reduced, CFG) - preprocess(decode_image(data, FULL), CFG)).abs()
    assert float(delta.mean()) <= 0.01
    print(f"reduced-decode mean |delta| = {float(delta.mean()):.4f}, max = {float(delta.max()):.3f}")


def test_reduced_decode_never_goes_below_twice_the_input() -> None:
    data = encode(lesion_rgb(300, 520, seed=8), "JPEG")
    assert decode_image(data, CFG).shape[:2] == (300, 520)  # 1/2 would give 150 < 256: full decode


@pytest.mark.parametrize(
    "body,status,words",
    [
        (b"", 400, "empty"),
        (np.random.default_rng(0).bytes(5000), 415, "not an image"),
        (b"hello, this is text", 415, "not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "not an image"),
        (encode(lesion_rgb(seed=9), "JPEG")[:1500], 400, "truncated"),
        (png_header_only(40000, 40000), 413, "megapixels"),
    ],
)
def test_bad_input_gives_a_status_and_a_message(body: bytes, status: int, words: str) -> None:
    with pytest.raises(InputError) as e:
        decode_image(body, CFG)
    assert e.value.status == status and words in str(e.value)


def test_tta_views_are_the_dihedral_group_in_order() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    v = tta_views(x, 8).reshape(8, 2, 3, 4, 4)
    t = x.transpose(2, 3)
    expected = [x, x.flip(3), x.flip(2), x.flip(2).flip(3), t, t.flip(3), t.flip(2), t.flip(2).flip(3)]
    for i, e in enumerate(expected):
        assert torch.equal(v[i], e), f"view {i}"
    for n in (1, 2, 4):
        assert torch.equal(tta_views(x, n), torch.cat(expected[:n]))
    assert len({tuple(v[i].flatten().tolist()) for i in range(8)}) == 8


class LinearLogit(torch.nn.Module):
    """A model whose logit depends on the view's orientation, so TTA averaging is visible."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, 128, 128, generator=g) / 300

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2, 3))[:, None]


@pytest.mark.parametrize("views", [1, 2, 4, 8])
def test_probability_is_the_mean_of_sigmoids_over_views(views: int) -> None:
    model = LinearLogit()
    cfg = PipelineConfig(tta_views=views)
    imgs = [preprocess(lesion_rgb(seed=s), cfg) for s in (10, 11, 12)]
    got = Scorer(model, cfg).predict(imgs)
    for img, p in zip(imgs, got, strict=True):
        vs = tta_views(img[None], views)
        expected = torch.sigmoid(model(vs).double()).mean().item()
        assert p == pytest.approx(expected, abs=1e-7)  # float32 logits, summed in another order
    # one image alone scores the same as inside a batch
    assert Scorer(model, cfg).predict(imgs[1:2])[0] == pytest.approx(got[1], abs=1e-7)


def test_view_probabilities_checks_the_model_output_shape() -> None:
    with pytest.raises(RuntimeError, match="expected"):
        view_probabilities(torch.zeros(8, 2), 1, 8)


def test_config_rejects_typos_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown"):
        PipelineConfig.from_mapping({"treshold": 0.3})
    with pytest.raises(ValueError):
        PipelineConfig(tta_views=3)
    with pytest.raises(ValueError):
        PipelineConfig(threshold=1.5)
    cfg = PipelineConfig.from_mapping(PipelineConfig(threshold=0.2).to_mapping())
    assert cfg == PipelineConfig(threshold=0.2)


def test_result_schema_and_demo_warning() -> None:
    info = {"name": "melanoma", "version": "0.0-demo", "weights_sha256": "ab", "demo": True}
    r = result(Score(0.7, 0.7), PipelineConfig(threshold=0.6), ArchiveMetadata(**info))
    assert r["label"] == "malignant" and r["threshold"] == 0.6 and r["tta_views"] == 8
    assert r["raw_score"] == 0.7 and r["calibration"] == {"method": "none"}
    assert r["operating_point"] == {"threshold": 0.6, "chosen_for": "fixed threshold (build_mar.sh --threshold)"}
    assert r["model"] == {**info, "precision": "fp32", "runtime": "torchscript"} and "DEMO" in r["warning"]
    r2 = result(Score(0.59, 0.59), PipelineConfig(threshold=0.6), ArchiveMetadata(**{**info, "demo": False}))
    assert r2["label"] == "benign" and "warning" not in r2


def test_archive_metadata_is_a_typed_versioned_record() -> None:
    """metadata.json round-trips; an unknown or missing key, a wrong type or another schema fails at load
    with one line that says to rebuild."""
    meta = ArchiveMetadata(version="1.0", architecture="resnest50_fast_4s1x64d", weights_sha256="ab",
                           explain={"file": "explain.pt", "method": "layer-cam", "layer": "layer3"})
    data = meta.to_mapping()
    assert ArchiveMetadata.from_mapping(data) == meta and data["schema"] == 1
    assert ArchiveMetadata.from_mapping({k: v for k, v in data.items() if k != "schema"}) == meta  # schema 1
    older = {**data, "explain": {**data["explain"], "method": "grad-cam"}}  # archives built before LayerCAM
    assert ArchiveMetadata.from_mapping(older).explain["method"] == "grad-cam"
    cases = [
        ({**data, "treshold": 0.3}, "unknown key(s) treshold"),
        ({k: v for k, v in data.items() if k != "demo"}, "missing key(s) demo"),
        ({**data, "demo": "no"}, "demo must be bool"),
        ({**data, "outputs": True}, "outputs must be int"),
        ({**data, "precision": {"name": "int4"}}, "precision must be an object whose name is one of fp32, bf16, int8"),
        ({**data, "precision": {"name": "int8", "format": "openvino"}}, "an int8 model runs on aotinductor"),
        ({**data, "explain": {"file": "explain.pt"}}, "explain must be null or an object"),
        ({**data, "explain": {**data["explain"], "method": "score-cam"}}, "explain.method 'score-cam' is not one"),
        ({**data, "precision": {"name": "bf16", "format": "torchscript"}}, "runs on aotinductor or openvino"),
        ({**data, "precision": {"name": "fp32", "format": "aotinductor"}}, "runs on torchscript or openvino"),
        ({**data, "schema": 2}, "schema 2; this handler reads schema 1"),
        ([1, 2], "must hold an object"),
    ]
    for bad, words in cases:
        with pytest.raises(ArchiveError) as e:
            ArchiveMetadata.from_mapping(bad)
        assert words in str(e.value) and "rebuild" in str(e.value), str(e.value)
        assert "\n" not in str(e.value)


def test_runtime_is_read_from_the_precision_record() -> None:
    """What runs the model is part of the record and of every response; an OpenVINO archive on a machine
    without OpenVINO is refused at load with the command that installs it."""
    ov = ArchiveMetadata(precision={"name": "fp32", "format": "openvino", "openvino": "2026.4.1"})
    assert ov.runtime == "openvino" and ArchiveMetadata().runtime == "torchscript"
    assert result(Score(0.3, 0.3), PipelineConfig(), ov)["model"]["runtime"] == "openvino"
    import importlib.util
    from unittest import mock

    with mock.patch.object(importlib.util, "find_spec", return_value=None), \
            pytest.raises(RuntimeError, match="OpenVINO, which is not installed: scripts/setup.sh --openvino"):
        check_runtime(ov.precision)


def test_interpolation_travels_in_the_pipeline_config() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    linear, cubic = PipelineConfig(), PipelineConfig(interpolation="cubic", area_for_downscale=False)
    assert PipelineConfig.from_mapping(cubic.to_mapping()) == cubic
    assert not np.array_equal(preprocess(rgb, linear).numpy(), preprocess(rgb, cubic).numpy())
    with pytest.raises(ValueError, match="interpolation must be one of"):
        PipelineConfig(interpolation="bilinear")


def test_compiled_archives_are_refused_where_they_cannot_run() -> None:
    """A bf16 archive is native code for one torch and one CPU ISA: a mismatch is a clear error, never a crash."""
    meta = {"name": "bf16", "format": "aotinductor", "torch": torch.__version__, "cpu_flags": ["avx512f", "fma"]}
    check_runtime(meta, "flags\t: fpu avx2 fma avx512f")
    check_runtime(meta, "")  # flags unreadable (not Linux): nothing to check against
    with pytest.raises(RuntimeError, match="this CPU lacks avx512f: rebuild it on this machine"):
        check_runtime(meta, "flags\t: fpu avx2 fma")
    with pytest.raises(RuntimeError, match="compiled for torch 1.0, this is torch"):
        check_runtime({**meta, "torch": "1.0"}, "flags\t: avx512f fma")
    with pytest.raises(RuntimeError, match="earlier version in a format no longer served"):
        check_runtime({"name": "bf16"})
    check_runtime({"name": "fp32"}, "flags\t: fpu")


def test_openvino_bf16_is_refused_on_other_bf16_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """An OpenVINO bf16 archive's agreement was measured with the build CPU's bf16 kernels (AMX, or
    AVX512-BF16 alone): another kind, or none (OpenVINO would run f32), is refused with what to do."""
    import handler.archive

    monkeypatch.setattr(handler.archive, "require_openvino", lambda *also: None)
    meta = {"name": "bf16", "format": "openvino", "openvino": "2026.4.1", "cpu_flags": ["amx_bf16", "avx512_bf16"]}
    check_runtime(meta, "flags\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile")
    check_runtime(meta, "")
    with pytest.raises(RuntimeError, match="measured on a CPU with amx_bf16, avx512_bf16; this one has "
                                           "avx512_bf16: rebuild it on this machine"):
        check_runtime(meta, "flags\t: avx2 avx512f avx512_bf16")
    with pytest.raises(RuntimeError, match="this one has none of them"):
        check_runtime(meta, "flags\t: avx2 fma")
    check_runtime({"name": "fp32", "format": "openvino"}, "flags\t: avx2 fma")  # fp32 runs anywhere


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, docker --cpus 2
    ({"cpu.max": "150000 100000\n"}, 1),  # 1.5 CPUs: rounded down
    ({"cpu.max": "50000 100000\n"}, 1),  # below one CPU: at least 1
    ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1 unlimited
    ({}, None),  # no cgroup files (not Linux, or not mounted)
])
def test_threads_honour_the_cgroup_cpu_quota(files: dict[str, str], expected: int | None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from handler.archive import usable_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)  # a 64-core node
    assert usable_cpus(tmp_path) == (64 if expected is None else expected)
