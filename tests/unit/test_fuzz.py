"""Mutated images of every accepted format through decode + preprocess: a finite tensor of the right shape,
or the pipeline's own InputError; never another exception, never slower than testkit.fuzz.TIME_LIMIT_S."""

from __future__ import annotations

import pytest

from testkit.fuzz import fuzz, seeds


def test_seeds_are_valid_images_of_every_format() -> None:
    from handler.pipeline import PipelineConfig
    from testkit.fuzz import check

    outcomes = {name: check(data, PipelineConfig()) for name, data in seeds().items()}
    assert outcomes.pop("png-huge-declared") == "input_error:413"
    assert set(outcomes.values()) == {"tensor"}, outcomes


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF/EXIF data
@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_images_give_a_tensor_or_an_input_error(seed: int) -> None:
    report = fuzz(600, seed=seed)
    assert report.findings == [], [(n, p) for n, p, _ in report.findings[:5]]
    assert report.outcomes["tensor"] > 50 and sum(v for k, v in report.outcomes.items() if k != "tensor") > 50
