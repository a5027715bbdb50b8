"""Deterministic synthetic grey-image dataset families, unlike the demo's fundus data, in nnU-Net v2 raw format.

Why: the demo's fundus data (``demo_data.py``) is what the small ViT models were tuned on. Whether a result
holds beyond it needs data of another structure and intensity, with nnU-Net's U-Net trained next to it as the
reference (``benchmarks/quality.py --families``). Nothing here is tuned for a model: the same images go to
every row.

Families (one grey channel, 8 bits; labels 0 = background):

- ``cracks``: a textured, unevenly lit surface (grain at the scale of the lines, mottling, a tilt), thin
  crack-like dark lines of 1 to 3 px (``1 = crack``; each its own width and contrast, some faint) and compact
  bright or dark blobs of 5 to 22 px radius (``2 = blob``).
- ``oct``: OCT-like B-scans under speckle: a retina of eight layers of alternating brightness over a
  choroid, with a foveal pit; the seven layer boundaries are the thin structure (``1 = boundary``, 1 or 2 px
  across, one column at a time) and a small dark fluid pocket, under 1% of the image, is the rare class
  (``2 = fluid``).

Only numpy, Pillow and the demo generator's drawing helpers are used, so the output is byte-identical for
the same parameters wherever numpy's PCG64 generator and zlib behave the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np

from nnunetv2.vit.demo_data import blur121, rasterise, smooth_field, write_generated_dataset

#: Bump when the drawing code changes, so an old dataset on disk is not silently reused.
GENERATOR_VERSION = 1

Case = Tuple[np.ndarray, np.ndarray]
#: The widths (px) of thin structures the generators draw: cracks and layer boundaries.
CRACK_WIDTHS = (1.0, 3.0)
BOUNDARY_WIDTHS = (1, 2)


# --------------------------------------------------------------------------------------------------
# cracks and blobs on a textured surface
# --------------------------------------------------------------------------------------------------


def _crack_segments(rng: np.random.Generator, size: int) -> np.ndarray:
    """Crack centre lines as wandering random walks, some with a side branch.

    Returns an (N, 7) array of segments as ``demo_data.rasterise`` takes them (x0, y0, x1, y1, w0, w1, kind),
    with ``kind`` the index of the crack (each crack gets its own contrast) and one width per crack, 1-3 px.
    """
    s = size / 256.0
    step = 2.0
    segs: list[tuple[float, ...]] = []
    num = int(rng.integers(3, 7))
    for kind in range(num):
        width = float(rng.uniform(*CRACK_WIDTHS))
        branches = [(rng.uniform(0.1, 0.9, size=2) * size, rng.uniform(-math.pi, math.pi),
                     rng.uniform(60.0, 200.0) * s)]
        while branches:
            (x, y), th, length = branches.pop()
            curv = 0.0
            for _ in range(int(length / step)):
                curv = 0.8 * curv + rng.normal(0.0, 0.05)
                th += curv + rng.normal(0.0, 0.08)
                nx, ny = x + step * math.cos(th), y + step * math.sin(th)
                if not (2.0 <= nx <= size - 3.0 and 2.0 <= ny <= size - 3.0):
                    break
                segs.append((x, y, nx, ny, width, width, kind))
                x, y = nx, ny
                if len(branches) == 0 and rng.random() < 0.01:
                    branches.append((np.array([x, y]), th + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2),
                                     rng.uniform(20.0, 60.0) * s))
    return np.asarray(segs, dtype=np.float64).reshape(-1, 7)


def make_crack_case(rng: np.random.Generator, size: int = 256) -> Case:
    """One grey image of a textured surface with cracks and blobs, and its label (0 background, 1 crack, 2 blob).

    The surface: a base grey, a linear tilt, mottling at three scales, and fine grain (blurred pixel noise
    at the scale of a crack's width). Blobs are soft-edged ellipses, brighter or darker than the surface,
    with a texture of their own. Cracks are dark lines drawn anti-aliased over everything; their label wins
    over a blob's where they cross one.
    """
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2.0
    img = np.full((size, size), rng.uniform(0.35, 0.65))
    img += rng.uniform(0.03, 0.1) * (((xx - c) * rng.normal() + (yy - c) * rng.normal()) / size)
    for grid, amplitude in ((3, 0.08), (12, 0.05), (max(4, size // 6), 0.04)):
        img += amplitude * rng.uniform(0.5, 1.0) * smooth_field(rng, size, grid)
    img += rng.uniform(0.03, 0.06) * blur121(rng.normal(0.0, 1.0, size=(size, size)))

    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        ry = rng.uniform(5.0, 22.0) * size / 256.0
        rx = ry * rng.uniform(0.6, 1.0)
        bx, by = rng.uniform(ry + 2.0, size - ry - 3.0, size=2)
        angle = rng.uniform(0.0, math.pi)
        u = (xx - bx) * math.cos(angle) + (yy - by) * math.sin(angle)
        v = -(xx - bx) * math.sin(angle) + (yy - by) * math.cos(angle)
        ell = np.hypot(u / rx, v / ry)
        soft = np.clip((1.0 - ell) * ry / 1.5 + 0.5, 0.0, 1.0)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        inner = sign * rng.uniform(0.12, 0.3) * (1.0 + 0.3 * smooth_field(rng, size, max(4, size // 16)))
        img += soft * inner
        label[ell <= 1.0] = 2

    segs = _crack_segments(rng, size)
    num = int(segs[:, 6].max()) + 1 if len(segs) else 0
    mask = np.zeros((size, size), dtype=bool)
    for kind in range(num):  # one crack at a time: each its own contrast
        one = segs[segs[:, 6] == kind].copy()
        one[:, 6] = 0
        cov, crack = rasterise(one, size)
        img *= 1.0 - rng.uniform(0.2, 0.6) * blur121(cov[0])
        mask |= crack
    label[mask] = 1

    img += rng.normal(0.0, 0.015, size=img.shape)
    image = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, label


# --------------------------------------------------------------------------------------------------
# OCT-like layered B-scans
# --------------------------------------------------------------------------------------------------

# Relative brightness of the retina's layers from the inner surface down (nerve fibres bright, nuclear
# layers dark, the photoreceptor line and the pigment epithelium brightest), and their mean thickness in
# pixels at 256 px; the choroid below.
_LAYER_BRIGHTNESS = (0.75, 0.45, 0.6, 0.25, 0.55, 0.2, 0.8, 0.95)
_LAYER_THICKNESS = (10.0, 12.0, 10.0, 10.0, 8.0, 22.0, 5.0, 8.0)
_CHOROID_BRIGHTNESS = 0.5


def make_oct_case(rng: np.random.Generator, size: int = 256) -> Case:
    """One grey OCT-like B-scan and its label (0 background, 1 layer boundary, 2 fluid).

    Layer boundaries are smooth curves across the width: the retina has a tilt and a wave, each layer's
    thickness varies slowly along the scan, and the inner five thin towards a foveal pit in the surface. The image is
    the layers' brightness, a fading choroid below and dark vitreous above, blurred a little along depth,
    under multiplicative speckle. Each of the seven boundaries between layers is labelled 1 where a pixel
    row is within half its width (1 or 2 px) of the curve, one run per column; a fluid pocket (a dark
    ellipse in the thick outer nuclear layer, away from its boundaries) is labelled 2.
    """
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    s = size / 256.0
    x = np.arange(size, dtype=np.float64)
    top = size * rng.uniform(0.22, 0.35) + rng.uniform(-0.08, 0.08) * (x - size / 2.0)
    top += 4.0 * s * smooth_field(rng, size, 3)[size // 2]
    pit_x, pit_w = size * rng.uniform(0.3, 0.7), size * rng.uniform(0.06, 0.1)
    pit = rng.uniform(0.6, 0.8) * np.exp(-0.5 * ((x - pit_x) / pit_w) ** 2)
    thickness = []
    for layer, mean in enumerate(_LAYER_THICKNESS):
        local = mean * s * rng.uniform(0.85, 1.15) * (1.0 + 0.15 * smooth_field(rng, size, 4)[layer * 7 % size])
        thickness.append(np.maximum(local * (1.0 - pit) if layer < 5 else local, 2.5))
    # Built from the outer surface up: the outer layers stay level and the surface dips into a pit where the
    # inner layers thin.
    bottom = top + sum(t.mean() for t in thickness)
    bounds = [bottom]
    for local in reversed(thickness):
        bounds.insert(0, bounds[0] - local)
    bounds = np.stack(bounds)  # (9, size): surface, 7 boundaries between layers, bottom of the last layer

    yy = np.arange(size, dtype=np.float64)[:, None]
    brightness = np.array(_LAYER_BRIGHTNESS) * rng.uniform(0.85, 1.15, size=len(_LAYER_BRIGHTNESS))
    depth = np.zeros((size, size), dtype=np.int64)
    for b in bounds:
        depth += yy >= b[None, :]
    # depth 0: vitreous; 1..8: layers; 9: choroid
    img = np.full((size, size), 0.06)
    for layer, value in enumerate(brightness):
        img[depth == layer + 1] = value
    choroid = depth == len(bounds)
    fade = np.exp(-np.maximum(yy - bounds[-1][None, :], 0.0) / (rng.uniform(25.0, 45.0) * s))
    img[choroid] = (_CHOROID_BRIGHTNESS * fade)[choroid]
    img *= 1.0 + 0.1 * smooth_field(rng, size, 6)

    label = np.zeros((size, size), dtype=np.uint8)
    onl_top, onl_bottom = bounds[5], bounds[6]  # the outer nuclear layer: the thick dark one
    fx = rng.uniform(0.15, 0.85) * size
    fi = int(round(fx))
    room = (onl_bottom[fi] - onl_top[fi]) / 2.0 - 3.0 * s
    fry = max(2.5, min(room, rng.uniform(4.0, 9.0) * s))
    frx = fry * rng.uniform(1.2, 2.5)
    fy = (onl_top[fi] + onl_bottom[fi]) / 2.0
    fluid = np.hypot((x[None, :] - fx) / frx, (yy - fy) / fry)
    img = img * (1.0 - 0.9 * np.clip((1.0 - fluid) * fry / 1.5 + 0.5, 0.0, 1.0))
    label[fluid <= 1.0] = 2

    img = 0.25 * np.roll(img, 1, axis=0) + 0.5 * img + 0.25 * np.roll(img, -1, axis=0)
    speckle = rng.gamma(shape=4.0, scale=0.25, size=(size, size))
    img = img * blur121(speckle) + rng.normal(0.0, 0.02, size=(size, size))

    for b in bounds[1:8]:  # the seven boundaries between layers
        half = 0.5 * float(rng.integers(BOUNDARY_WIDTHS[0], BOUNDARY_WIDTHS[1] + 1))
        start = np.floor(b + 0.5 - half).astype(np.int64)  # the `half * 2` rows nearest the curve
        for offset in range(int(2 * half)):
            rows = start + offset
            keep = (rows >= 0) & (rows < size)
            label[rows[keep], np.flatnonzero(keep)] = 1

    image = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, label


# --------------------------------------------------------------------------------------------------
# families and dataset writing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A dataset family: its drawing function, labels and nnU-Net dataset name."""

    make_case: Callable[[np.random.Generator, int], Case]
    labels: Dict[str, int]
    dataset_name: str
    description: str


FAMILIES: Dict[str, Family] = {
    "cracks": Family(make_crack_case, {"background": 0, "crack": 1, "blob": 2}, "SynthCracks",
                     "Grey textured surfaces with thin cracks (1-3 px) and compact blobs"),
    "oct": Family(make_oct_case, {"background": 0, "boundary": 1, "fluid": 2}, "SynthOCT",
                  "Grey OCT-like B-scans: layer boundaries (1-2 px) and a small fluid pocket"),
}


def write_synthetic_dataset(raw_root: str | Path, family: str, dataset_id: int, num_train: int = 24,
                            num_test: int = 6, size: int = 256, seed: int = 0) -> Path:
    """Write a family's dataset to ``raw_root/DatasetXXX_<family's name>`` and return that folder.

    The layout is the demo's (``imagesTr/<case>_0000.png``, one grey PNG; ``labelsTr/<case>.png``; the same
    under ``imagesTs``/``labelsTs``; ``dataset.json``), written, reused or refused as the demo's
    (``write_generated_dataset``).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown dataset family {family!r}; choose one of {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    record = {"family": family, "version": GENERATOR_VERSION, "seed": int(seed), "size": int(size),
              "num_train": int(num_train), "num_test": int(num_test)}
    return write_generated_dataset(
        raw_root, dataset_id, spec.dataset_name, spec.make_case, {"0": "grey"}, dict(spec.labels),
        f"{spec.description}, generated by benchmarks/synthetic_data.py (synthetic, not real data).",
        "synthetic_generator", record, family)
