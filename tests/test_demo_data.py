"""Tests for the synthetic fundus demo dataset (CPU only, small images, a handful of cases)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunetv2.vit import demo_data
from nnunetv2.vit.demo_data import dataset_folder_name, make_fundus_case, write_demo_dataset

SIZE = 128
SEEDS = (0, 1, 2)

try:
    from scipy import ndimage
except ImportError:  # pragma: no cover - scipy is optional
    ndimage = None


def _erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion with a 3x3 cross (scipy if present, else numpy); outside counts as False."""
    if ndimage is not None:
        return ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1))
    p = np.pad(mask, 1, constant_values=False)
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        p = np.pad(mask, 1, constant_values=False)
        mask = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return mask


@pytest.fixture(scope="module")
def cases():
    return [make_fundus_case(np.random.default_rng(s), SIZE) for s in SEEDS]


def test_case_types_and_determinism(cases):
    image, label = cases[0]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert label.shape == (SIZE, SIZE) and label.dtype == np.uint8
    image2, label2 = make_fundus_case(np.random.default_rng(SEEDS[0]), SIZE)
    np.testing.assert_array_equal(image, image2)
    np.testing.assert_array_equal(label, label2)
    other_image, other_label = cases[1]
    assert not np.array_equal(image, other_image)
    assert not np.array_equal(label, other_label)


def test_labels_and_circular_field_of_view(cases):
    c = (SIZE - 1) / 2.0
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(xx - c, yy - c)
    for image, label in cases:
        assert set(np.unique(label).tolist()) <= {0, 1, 2}
        fov = image.max(axis=-1) > 0
        radius = np.sqrt(fov.sum() / np.pi)
        assert 0.4 * SIZE < radius < 0.5 * SIZE
        assert fov[r <= radius - 1.0].all(), "field of view must be a filled circle"
        outside = r > radius + 1.0
        assert not fov[outside].any()
        assert (image[~fov] == 0).all()
        assert (label[~fov] == 0).all()


def test_vessel_and_disc_fractions(cases):
    for image, label in cases:
        fov = image.max(axis=-1) > 0
        vessel_frac = (label == 1).sum() / fov.sum()
        disc_frac = (label == 2).sum() / fov.sum()
        assert 0.03 <= vessel_frac <= 0.25, vessel_frac
        assert 0.005 <= disc_frac <= 0.05, disc_frac
        # vessel trees start at the optic disc
        assert (label[_dilate(label == 2, 2)] == 1).any()


def test_thin_vessels_exist(cases):
    for _, label in cases:
        vessel = label == 1
        vanished = 1.0 - _erode_cross(vessel).sum() / vessel.sum()
        assert vanished >= 0.2, f"only {vanished:.0%} of vessel pixels are in thin (1-2 px) vessels"


def test_vessels_darker_than_background(cases):
    for image, label in cases:
        background = (label == 0) & (image.max(axis=-1) > 0)
        vessel = label == 1
        for channel in (0, 1):  # red and green
            plane = image[..., channel].astype(np.float64)
            assert plane[vessel].mean() < plane[background].mean() - 3.0


def test_dataset_folder_name():
    assert dataset_folder_name(999, "DemoFundus") == "Dataset999_DemoFundus"
    assert dataset_folder_name(7, "X") == "Dataset007_X"
    for bad_id in (0, 1000, -3):
        with pytest.raises(ValueError):
            dataset_folder_name(bad_id, "X")
    with pytest.raises(ValueError):
        dataset_folder_name(5, "a/b")


def _write(root: Path, **kw) -> Path:
    params = dict(dataset_id=998, name="DemoFundus", num_train=3, num_test=2, size=SIZE, seed=0)
    params.update(kw)
    return write_demo_dataset(root, **params)


def _snapshot(folder: Path) -> dict:
    """Relative path -> (mtime_ns, bytes) for every file and directory below and including folder."""
    out = {".": (folder.stat().st_mtime_ns, None)}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return root, _write(root)


def test_written_layout(written):
    root, folder = written
    assert folder == root / "Dataset998_DemoFundus"
    assert sorted(os.listdir(root)) == ["Dataset998_DemoFundus"], "no temporary folder may be left"
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "vessel": 1, "optic_disc": 2}
    assert meta["numTraining"] == 3
    assert meta["file_ending"] == ".png"
    assert "synthetic" in meta["description"].lower()
    gen = meta["demo_generator"]
    assert (gen["seed"], gen["size"], gen["num_train"], gen["num_test"]) == (0, SIZE, 3, 2)

    train = [f"fundus_{i:03d}" for i in range(3)]
    test = [f"fundus_test_{i:03d}" for i in range(2)]
    for img_dir, lab_dir, names in (("imagesTr", "labelsTr", train), ("imagesTs", "labelsTs", test)):
        assert sorted(os.listdir(folder / img_dir)) == [f"{n}_0000.png" for n in names]
        assert sorted(os.listdir(folder / lab_dir)) == [f"{n}.png" for n in names]
        for n in names:
            with Image.open(folder / img_dir / f"{n}_0000.png") as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (SIZE, SIZE))
                image = np.asarray(im)
            with Image.open(folder / lab_dir / f"{n}.png") as lab:
                assert (lab.format, lab.mode, lab.size) == ("PNG", "L", (SIZE, SIZE))
                label = np.asarray(lab)
            assert image.shape == (SIZE, SIZE, 3) and label.shape == (SIZE, SIZE)
            assert set(np.unique(label).tolist()) == {0, 1, 2}


def test_written_bytes_deterministic_and_independent_of_counts(written, tmp_path):
    _, folder = written
    again = _snapshot(_write(tmp_path / "a"))
    first = _snapshot(folder)
    assert {k: v[1] for k, v in again.items()} == {k: v[1] for k, v in first.items()}
    fewer = _write(tmp_path / "b", num_train=1, num_test=1)
    for rel in ("imagesTr/fundus_000_0000.png", "labelsTr/fundus_000.png",
                "imagesTs/fundus_test_000_0000.png", "labelsTs/fundus_test_000.png"):
        assert (fewer / rel).read_bytes() == (folder / rel).read_bytes()


def test_reuse_leaves_folder_untouched(written, caplog):
    root, folder = written
    before = _snapshot(folder)
    with caplog.at_level("INFO", logger=demo_data.__name__):
        assert _write(root) == folder
    assert _snapshot(folder) == before
    assert "Reusing" in caplog.text
    assert sorted(os.listdir(root)) == ["Dataset998_DemoFundus"]


def test_conflicts_raise(written):
    root, folder = written
    before = _snapshot(folder)
    with pytest.raises(FileExistsError, match="Dataset998_DemoFundus"):
        _write(root, seed=1)
    with pytest.raises(FileExistsError, match="Dataset998_DemoFundus"):
        _write(root, num_train=4)
    with pytest.raises(FileExistsError, match="Dataset998_DemoFundus"):
        _write(root, name="OtherName")
    assert _snapshot(folder) == before
    assert sorted(os.listdir(root)) == ["Dataset998_DemoFundus"]


def test_foreign_folder_with_same_id_raises(tmp_path):
    (tmp_path / "Dataset997_Real").mkdir()
    with pytest.raises(FileExistsError, match="Dataset997_Real"):
        _write(tmp_path, dataset_id=997)
    (tmp_path / "Dataset996_DemoFundus").mkdir()  # same name but not a demo dataset
    with pytest.raises(FileExistsError, match="Dataset996_DemoFundus"):
        _write(tmp_path, dataset_id=996)
    assert sorted(os.listdir(tmp_path)) == ["Dataset996_DemoFundus", "Dataset997_Real"]


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real = demo_data.make_fundus_case

    def flaky(rng, size=256):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(rng, size)

    monkeypatch.setattr(demo_data, "make_fundus_case", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _write(tmp_path)
    assert os.listdir(tmp_path) == []


def test_readable_by_nnunet_natural_image_io(written):
    reader_mod = pytest.importorskip("nnunetv2.imageio.natural_image_reader_writer")
    _, folder = written
    io = reader_mod.NaturalImage2DIO()
    image, _ = io.read_images([str(folder / "imagesTr" / "fundus_000_0000.png")])
    seg, _ = io.read_seg(str(folder / "labelsTr" / "fundus_000.png"))
    assert image.shape == (3, 1, SIZE, SIZE)
    assert seg.shape == (1, 1, SIZE, SIZE)
    assert set(np.unique(seg).tolist()) == {0.0, 1.0, 2.0}
