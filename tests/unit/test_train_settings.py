"""train's settings on --resume: the torch thread count (it orders the fp32 sums, so it decides the weights to
the last bit) is recorded in the checkpoint and kept by a resumed run unless --threads says otherwise."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from train.train import LAST, Settings, parse_args, settings_from, thread_note


def _interrupted(out: Path, **hyper: object) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": hyper}, out / LAST)
    return out


def test_a_new_run_records_its_thread_count(tmp_path: Path) -> None:
    base = ["--labels", "l.csv", "--images", "img", "--out", str(tmp_path / "r")]
    assert settings_from(parse_args(base)).threads == torch.get_num_threads()
    assert settings_from(parse_args([*base, "--threads", "3"])).threads == 3


@pytest.mark.parametrize(("flags", "expected"), [((), 3), (("--threads", "1"), 1)])
def test_resume_keeps_the_interrupted_runs_thread_count(tmp_path: Path, flags: tuple[str, ...],
                                                        expected: int) -> None:
    run = _interrupted(tmp_path / "r", **asdict(Settings("l.csv", "img", epochs=4, threads=3)))
    settings = settings_from(parse_args(["--out", str(run), "--resume", *flags]))
    assert settings == Settings("l.csv", "img", epochs=4, threads=expected)
    # Labels given again with --resume: the same rule.
    again = settings_from(parse_args(["--labels", "l.csv", "--images", "img", "--out", str(run), "--resume", *flags]))
    assert again.threads == expected


def test_a_checkpoint_from_before_the_count_was_recorded_resumes(tmp_path: Path) -> None:
    hyper = {k: v for k, v in asdict(Settings("l.csv", "img")).items() if k != "threads"}
    run = _interrupted(tmp_path / "r", **hyper)
    assert settings_from(parse_args(["--out", str(run), "--resume"])).threads == torch.get_num_threads()
    assert thread_note(hyper, Settings("l.csv", "img", threads=5)) is None  # nothing recorded: nothing to compare


def test_another_thread_count_is_allowed_with_a_warning() -> None:
    was = asdict(Settings("l.csv", "img", threads=2))
    assert thread_note(was, Settings("l.csv", "img", threads=2)) is None
    note = thread_note(was, Settings("l.csv", "img", threads=1))
    assert note is not None and note.startswith("train: warning:") and "2 torch thread(s)" in note
    assert "this one uses 1" in note


def test_a_checkpoint_from_before_several_sources_resumes_as_it_was(tmp_path: Path) -> None:
    """One label file as a str, init None (scratch, before --init imagenet), no val_source or indeterminate: the
    resumed run is that run, not today's defaults (an ImageNet start would refetch and change nothing it uses)."""
    old = {"labels": "l.csv", "images": "img", "init": None, "epochs": 4, "batch_size": 32, "lr": 3e-4,
           "weight_decay": 1e-2, "warmup_epochs": 1.0, "pos_weight": 1.0, "val_fraction": 0.2, "seed": 42,
           "augment": True, "precision": "fp32", "device": "cpu", "image_size": 128, "threads": 2}
    run = _interrupted(tmp_path / "r", **old)
    settings = settings_from(parse_args(["--out", str(run), "--resume"]))
    assert settings == Settings(("l.csv",), ("img",), init="scratch", epochs=4, threads=2)
    assert settings.val_source is None and settings.indeterminate == "exclude"
    # Labels given again: the interrupted run's start is kept unless --init says otherwise.
    again = settings_from(parse_args(["--labels", "l.csv", "--images", "img", "--out", str(run), "--resume"]))
    assert again.init == "scratch"
