"""Tests for the synthetic dataset families of benchmarks/quality.py (CPU only, a handful of small cases)."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from benchmarks.synthetic_data import FAMILIES, make_crack_case, make_oct_case, write_synthetic_dataset

SIZE = 128
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    name = request.param
    return name, [FAMILIES[name].make_case(np.random.default_rng(s), SIZE) for s in SEEDS]


def test_cases_are_grey_uint8_with_every_class_and_deterministic(family):
    name, cases = family
    for image, label in cases:
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
        assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) == set(FAMILIES[name].labels.values())  # every class in every case
        assert image.std() > 10  # not a flat image
    image, label = FAMILIES[name].make_case(np.random.default_rng(SEEDS[0]), SIZE)
    np.testing.assert_array_equal(image, cases[0][0])
    np.testing.assert_array_equal(label, cases[0][1])
    assert not np.array_equal(cases[0][1], cases[1][1])


def test_cracks_are_one_to_three_pixels_wide():
    """Across a crack: no pixel further than 2 px from the background (3 px across at most, crossings
    aside), and the cracks are no wider than 3 px when measured along image rows or columns, where they run
    across them."""
    for seed in range(6):
        _, label = make_crack_case(np.random.default_rng(seed), 256)
        crack = label == 1
        inner = ndimage.distance_transform_edt(np.pad(crack, 1))[1:-1, 1:-1]
        assert np.mean(inner[crack] <= 2.0) > 0.99
        # every crack pixel has background within 2 px on some axis: no 5 px wide run both ways
        assert not ndimage.binary_erosion(crack, np.ones((5, 5), bool)).any()
        assert crack.sum() > 100


def test_oct_boundaries_are_one_or_two_rows_in_every_column():
    _, label = make_oct_case(np.random.default_rng(0), 256)
    boundary = label == 1
    runs = [np.flatnonzero(np.diff(np.concatenate([[0], column, [0]])) != 0).reshape(-1, 2)
            for column in boundary.T.astype(np.int8)]
    widths = np.concatenate([r[:, 1] - r[:, 0] for r in runs])
    assert widths.min() >= 1 and np.median(widths) <= 2
    assert all(len(r) >= 3 for r in runs)  # separate boundaries in every column (some merge in the pit)
    fluid = (label == 2).mean()
    assert 0 < fluid < 0.01  # the rare class


def test_write_synthetic_dataset_layout_and_reuse(tmp_path):
    folder = write_synthetic_dataset(tmp_path, "cracks", 998, num_train=2, num_test=1, size=64)
    assert folder.name == "Dataset998_SynthCracks"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "grey"} and meta["labels"]["blob"] == 2 and meta["numTraining"] == 2
    image = np.asarray(Image.open(folder / "imagesTr" / "cracks_000_0000.png"))
    assert image.shape == (64, 64) and image.dtype == np.uint8
    assert (folder / "labelsTs" / "cracks_test_000.png").is_file()
    first = (folder / "imagesTr" / "cracks_001_0000.png").read_bytes()
    assert write_synthetic_dataset(tmp_path, "cracks", 998, num_train=2, num_test=1, size=64) == folder
    assert (folder / "imagesTr" / "cracks_001_0000.png").read_bytes() == first
    with pytest.raises(FileExistsError, match="not this dataset"):
        write_synthetic_dataset(tmp_path, "cracks", 998, num_train=3, num_test=1, size=64)
    with pytest.raises(FileExistsError, match="already uses dataset id 998"):
        write_synthetic_dataset(tmp_path, "oct", 998, num_train=2, num_test=1, size=64)
    with pytest.raises(ValueError, match="unknown dataset family"):
        write_synthetic_dataset(tmp_path, "nope", 997)
