"""Preprocessing travels with the weights: a checkpoint's recorded pipeline decides the archive's (build_mar.sh takes
it; without a record, today's defaults and a notice; an explicit option that contradicts it is refused), and the
training cache is keyed on every field that decides the cached pixels."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    _recorded_pipeline,
    build_model,
    load_checkpoint,
    pipeline_config,
)
from handler.pipeline import IMAGE_SIZE, PREPROCESSING, PipelineConfig, resize
from train.data import AFTER_CACHE, _cache_key

SERVING = {"tta_views": 4, "threshold": 0.3}


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in build_model(1).state_dict().items()}


def _ckpt(folder: Path, state_dict: dict[str, torch.Tensor], hyper: dict | None) -> Path:
    path = folder / "run.ckpt"
    torch.save({"state_dict": state_dict, "epoch": 1, "global_step": 3,
                **({"hyper_parameters": hyper} if hyper is not None else {})}, path)
    return path


def test_the_record_decides_and_a_contradicting_option_is_refused(tmp_path: Path,
                                                                  state_dict: dict[str, torch.Tensor]) -> None:
    trained = PipelineConfig(image_size=96, interpolation="cubic")
    ckpt = load_checkpoint(_ckpt(tmp_path, state_dict, {"lr": 1e-3, "pipeline": trained.to_mapping()}))
    assert ckpt.pipeline == trained.to_mapping()
    cfg, notice = pipeline_config(ckpt, {"image_size": None, "interpolation": None}, SERVING)
    assert cfg == dataclasses.replace(trained, **SERVING) and "image_size 96" in notice
    assert pipeline_config(ckpt, {"image_size": 96}, SERVING)[0] == cfg  # an option that agrees is fine
    for explicit, words in (({"image_size": 128}, "--image-size 128 contradicts the checkpoint, trained with "
                                                  "image_size 96"),
                            ({"interpolation": "linear"}, "--interpolation linear contradicts")):
        with pytest.raises(CheckpointError, match=words) as e:
            pipeline_config(ckpt, explicit, SERVING)
        assert "\n" not in str(e.value)


def test_without_a_record_the_defaults_and_a_notice(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    ckpt = load_checkpoint(_ckpt(tmp_path, state_dict, {"lr": 1e-3}))
    assert ckpt.pipeline is None
    cfg, notice = pipeline_config(ckpt, {}, SERVING)
    assert cfg == PipelineConfig(**SERVING) and cfg.image_size == IMAGE_SIZE
    assert notice.startswith("this checkpoint records no pipeline config") and f"image_size {IMAGE_SIZE}" in notice
    cfg, notice = pipeline_config(ckpt, {"image_size": 160}, SERVING)  # a foreign checkpoint: the options decide
    assert cfg.image_size == 160 and "the options given" in notice
    demo = LoadedCheckpoint(torch.nn.Identity(), 1, "demo", "")
    assert pipeline_config(demo, {}, SERVING)[1] is None  # the demo (demo_checkpoint's form): nothing to say
    # Where a record may sit: Lightning's hyper_parameters, or 2020-era hparams (an argparse.Namespace too).
    record = PipelineConfig(image_size=96).to_mapping()
    for obj in ({"state_dict": {}}, {"hparams": {"lr": 1}}):
        assert _recorded_pipeline(tmp_path, obj) is None
    for obj in ({"hparams": {"pipeline": record}}, {"hparams": argparse.Namespace(pipeline=record)}):
        assert _recorded_pipeline(tmp_path, obj) == record


@pytest.mark.parametrize("record", [{"image_size": 96, "crop": 0.9}, {"image_size": 4}, ["image_size", 96]])
def test_a_record_this_version_cannot_read_is_refused(record: object, tmp_path: Path) -> None:
    tiny = {"model.fc.weight": torch.zeros(1, 2)}  # refused before the weights are even looked at
    with pytest.raises(CheckpointError, match="its recorded pipeline config cannot be used"):
        load_checkpoint(_ckpt(tmp_path, tiny, {"pipeline": record}))


# A value other than the default for every field of PipelineConfig.
OTHER = {"image_size": 96, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "max_pixel_value": 1.0,
         "tta_views": 4, "threshold": 0.3, "max_image_pixels": 10_000, "max_decoded_pixels": 10_000,
         "reduced_decode": False,
         "interpolation": "area", "area_for_downscale": False, "temperature": 2.0}


def test_the_cache_key_covers_every_field_the_cached_pixels_depend_on(tmp_path: Path) -> None:
    assert set(OTHER) == {f.name for f in dataclasses.fields(PipelineConfig)}, "a new field: give it a value here"
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    base = _cache_key([image], PipelineConfig())
    for name, value in OTHER.items():
        changed = _cache_key([image], dataclasses.replace(PipelineConfig(), **{name: value})) != base
        assert changed == (name not in AFTER_CACHE), name
    assert set(PREPROCESSING) - AFTER_CACHE == {"image_size", "reduced_decode", "interpolation", "area_for_downscale"}
    # The fields the key covers do change the cached pixels: the interpolation (the field it once missed) too.
    rgb = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)  # upscaled: no INTER_AREA
    a = resize(rgb, PipelineConfig(image_size=96))
    b = resize(rgb, PipelineConfig(image_size=96, interpolation="cubic"))
    assert a.shape == b.shape == (96, 96, 3) and not np.array_equal(a, b)
