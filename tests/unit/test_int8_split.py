"""int8's calibration images and the images its agreement is measured on never overlap."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.precision import MAX_CALIBRATION_IMAGES, MIN_IMAGES, PrecisionError, split_for_int8


@pytest.mark.parametrize("n", [27, 40, 96, 400])
def test_split_is_disjoint_and_whole(n: int) -> None:
    files = [Path(f"img{i:04d}.jpg") for i in range(n)]
    calibrate, measured = split_for_int8(files)
    assert not set(calibrate) & set(measured) and sorted(calibrate + measured) == files
    assert len(measured) >= MIN_IMAGES
    assert len(calibrate) == min(-(-n // 4), MAX_CALIBRATION_IMAGES)  # every 4th, spread over the folder
    assert calibrate[-1] >= files[min(n, 4 * MAX_CALIBRATION_IMAGES) - 4]


def test_too_few_images_for_both_roles() -> None:
    with pytest.raises(PrecisionError, match=r"int8 needs at least 27 images \(26 given\)"):
        split_for_int8([Path(f"{i}.jpg") for i in range(26)])
