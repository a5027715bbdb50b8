"""Deterministic synthetic colour-fundus (retina photograph) dataset in nnU-Net v2 raw format.

Why: the repository needs a built-in demo that runs end to end (plan, preprocess, train, predict)
without downloading anything. Real fundus vessel datasets (DRIVE, CHASE, ...) have licences and
registration steps, so this module draws look-alike images instead: a circular field of view,
reddish-orange background with uneven illumination, a bright optic disc, a dark macula and branching
vessel trees whose widths taper from a few pixels at the disc to 1 px at the tips. Thin vessels are
what makes fundus segmentation hard, so they are guaranteed to exist.

Labels: 0 = background, 1 = vessel, 2 = optic disc. Only numpy, Pillow and the standard library are
used, so the output is byte-identical wherever numpy's PCG64 generator and zlib behave the same.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

#: Bump when the drawing code changes, so an old demo dataset on disk is not silently reused.
GENERATOR_VERSION = 1

LABELS = {"background": 0, "vessel": 1, "optic_disc": 2}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


# --------------------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------------------


def _wrap(angle: float) -> float:
    """Wrap an angle to (-pi, pi] so heading corrections take the short way round."""
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


def smooth_field(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1] (illumination, texture): a coarse random grid upsampled with smoothstep."""
    coarse = rng.uniform(-1.0, 1.0, size=(grid + 1, grid + 1))
    pos = (np.arange(size) + 0.5) * (grid / size)
    i0 = np.minimum(pos.astype(np.int64), grid - 1)
    f = pos - i0
    f = f * f * (3.0 - 2.0 * f)  # smoothstep: no visible grid creases
    rows = coarse[i0] * (1.0 - f)[:, None] + coarse[i0 + 1] * f[:, None]  # (size, grid+1)
    return rows[:, i0] * (1.0 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def blur121(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur of a 2D array (edge-replicated): softens vessel edges slightly."""
    p = np.pad(a, 1, mode="edge")
    v = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * v[:, :-2] + 0.5 * v[:, 1:-1] + 0.25 * v[:, 2:]


def grow_vessels(
    rng: np.random.Generator,
    size: int,
    fov_c: float,
    fov_r: float,
    disc: tuple[float, float, float, float],
    macula: tuple[float, float, float],
    side: int,
) -> np.ndarray:
    """Grow artery/vein trees from the optic disc as branching, tapering random walks.

    Returns an (N, 7) float array of segments: x0, y0, x1, y1, w0, w1, kind (0 artery, 1 vein),
    with widths in pixels. Growth is a stack of branches; each step turns the heading a little
    (noise + persistent curvature + pull towards a target heading), big vessels are steered around
    the macula, small ones stop at the foveal avascular zone, and branching splits width roughly
    following Murray's law (w_parent^3 = w_child1^3 + w_child2^3). Only the walk itself is a Python
    loop (it is sequential); drawing is vectorised in ``rasterise``.
    """
    s = size / 256.0
    step = max(2.0 * s, 1.0)
    disc_x, disc_y, _, disc_ry = disc
    mx, my, m_avoid = macula
    tx = -float(side)  # x direction from the disc towards the macula (temporal)
    max_segments = int(8000 * s * s) + 2000  # runaway guard only; typical cases use < half

    # branch: [x, y, heading, width, target heading, pull, kind, tip_left, curvature]
    stack: list[list[float]] = []
    for vert in (-1.0, 1.0):  # superior and inferior arcades, then nasal vessels
        for kind, w_lo, w_hi in ((1, 5.0, 6.2), (0, 4.0, 5.0)):
            heading = math.atan2(vert, tx * rng.uniform(0.15, 0.5))
            target = math.atan2(vert * rng.uniform(0.1, 0.35), tx)
            off = rng.uniform(-0.25, 0.25) * disc_ry
            stack.append([disc_x + off, disc_y + vert * 0.2 * disc_ry, heading,
                          rng.uniform(w_lo, w_hi) * s, target, 0.035, kind, -1.0, 0.0])
        for _ in range(int(rng.integers(1, 3))):
            heading = math.atan2(vert * rng.uniform(0.3, 1.6), -tx)
            stack.append([disc_x, disc_y, heading, rng.uniform(2.5, 3.8) * s, heading, 0.01,
                          int(rng.integers(0, 2)), -1.0, 0.0])
    for _ in range(int(rng.integers(1, 3))):  # small papillo-macular vessels
        heading = math.atan2(rng.uniform(-0.35, 0.35), tx)
        stack.append([disc_x, disc_y + rng.uniform(-0.5, 0.5) * disc_ry, heading,
                      rng.uniform(1.6, 2.4) * s, heading, 0.01, int(rng.integers(0, 2)), -1.0, 0.0])
    stack.reverse()

    segs: list[tuple[float, ...]] = []
    taper = rng.uniform(0.010, 0.015)  # width lost per pixel of length (scale-free)
    branch_spacing = rng.uniform(20.0, 30.0) * s
    w_min = 1.0
    edge = fov_r - 1.5
    while stack and len(segs) < max_segments:
        x, y, th, w, target, pull, kind, tip_left, curv = stack.pop()
        while len(segs) < max_segments:
            # heading update: noise, persistent curvature and pull towards the branch's course
            curv = 0.85 * curv + rng.normal(0.0, 0.02)
            th = th + curv + rng.normal(0.0, 0.045) + pull * _wrap(target - th)
            d_mac = math.hypot(x - mx, y - my)
            if d_mac < 2.2 * m_avoid:
                if w <= 2.0 * s:
                    if d_mac < m_avoid:
                        break  # small vessels end at the foveal avascular zone
                else:
                    # large vessels bend around the macula along the nearer tangent
                    phi = math.atan2(y - my, x - mx)
                    t1, t2 = phi + math.pi / 2, phi - math.pi / 2
                    tang = t1 if abs(_wrap(t1 - th)) < abs(_wrap(t2 - th)) else t2
                    strength = 1.0 if d_mac < m_avoid else 0.25 * (1.0 - d_mac / (2.2 * m_avoid))
                    th = th + strength * _wrap(tang - th)
            nx, ny = x + step * math.cos(th), y + step * math.sin(th)
            if math.hypot(nx - fov_c, ny - fov_c) > edge:
                break
            nw = max(w - taper * step, w_min)
            segs.append((x, y, nx, ny, w, nw, kind))
            x, y, w = nx, ny, nw
            if w <= w_min:
                if tip_left < 0:
                    tip_left = rng.uniform(10.0, 40.0) * s
                tip_left -= step
                if tip_left <= 0:
                    break
            elif rng.random() < step / branch_spacing * min(1.0, 0.4 + w / (3.0 * s)):
                wc = max(w * rng.uniform(0.35, 0.8), w_min)
                sign = 1.0 if rng.random() < 0.5 else -1.0
                ch = _wrap(th + sign * rng.uniform(0.45, 1.2))
                stack.append([x, y, ch, wc, ch, 0.01, kind, -1.0, 0.0])
                w = max((max(w**3 - wc**3, 0.0)) ** (1.0 / 3.0), 0.8 * w, w_min)
                th -= sign * rng.uniform(0.05, 0.25)
    return np.asarray(segs, dtype=np.float64).reshape(-1, 7)


def rasterise(segs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise tapered segments: returns (coverage (2, size, size) float, crisp mask (size, size)).

    Every segment is evaluated in a fixed-size pixel window around it, all segments at once, and
    the per-pixel maximum is scattered with ``np.maximum.at``. Coverage is an anti-aliased
    (box-filter) estimate used for drawing; the mask is ``distance <= width / 2`` used as label.
    Coverage is pre-multiplied by a width-dependent contrast, per kind (artery, vein).
    """
    cov = np.zeros(2 * size * size, dtype=np.float64)
    mask = np.zeros(size * size, dtype=bool)
    if len(segs) == 0:
        return cov.reshape(2, size, size), mask.reshape(size, size)
    x0, y0, x1, y1, w0, w1, kind = segs.T
    r0, r1 = 0.5 * w0, 0.5 * w1
    pad = float(max(r0.max(), r1.max())) + 1.5
    seg_len = float(np.hypot(x1 - x0, y1 - y0).max())
    k = int(math.ceil(seg_len + 2.0 * pad)) + 2
    off_y, off_x = np.divmod(np.arange(k * k), k)
    lo_x = np.floor(np.minimum(x0, x1) - pad).astype(np.int64)
    lo_y = np.floor(np.minimum(y0, y1) - pad).astype(np.int64)
    px = lo_x[:, None] + off_x[None, :]
    py = lo_y[:, None] + off_y[None, :]
    dx, dy = (x1 - x0)[:, None], (y1 - y0)[:, None]
    l2 = np.maximum(dx * dx + dy * dy, 1e-9)
    t = np.clip(((px - x0[:, None]) * dx + (py - y0[:, None]) * dy) / l2, 0.0, 1.0)
    dist = np.hypot(px - (x0[:, None] + t * dx), py - (y0[:, None] + t * dy))
    rad = r0[:, None] + t * (r1 - r0)[:, None]
    inside = (px >= 0) & (px < size) & (py >= 0) & (py < size)
    s = size / 256.0
    contrast = 0.55 + 0.45 * np.clip((2.0 * rad - 1.0) / (3.0 * s), 0.0, 1.0)
    c = np.clip(rad + 0.5 - dist, 0.0, 1.0) * contrast
    flat = py * size + px
    hit = inside & (c > 0)
    idx = (kind.astype(np.int64)[:, None] * (size * size) + flat)[hit]
    np.maximum.at(cov, idx, c[hit])
    mask[flat[inside & (dist <= rad)]] = True
    return cov.reshape(2, size, size), mask.reshape(size, size)


def fundus_anatomy(rng: np.random.Generator, size: int) -> tuple:
    """A fundus image's geometry, drawn from ``rng``: centre ``c``, pixel grids ``yy, xx``, field-of-view radius
    ``fov_r``, radius map ``rr`` and mask ``fov``, the side of the optic disc, the disc ``(x, y, rx, ry)`` off
    centre on that side and the macula ``(x, y, sigma)`` on the other side, slightly below."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    fov_r = size * rng.uniform(0.455, 0.485)
    rr = np.hypot(xx - c, yy - c) / fov_r
    side = 1 if rng.random() < 0.5 else -1
    disc_ry = fov_r * rng.uniform(0.13, 0.16)
    disc_rx = disc_ry * rng.uniform(0.8, 0.95)
    disc_x = c + side * fov_r * rng.uniform(0.33, 0.42)
    disc_y = c + fov_r * rng.uniform(-0.1, 0.1)
    mac_x = disc_x - side * fov_r * rng.uniform(0.66, 0.76)
    mac_y = disc_y + fov_r * rng.uniform(0.0, 0.08)
    mac_sigma = fov_r * rng.uniform(0.1, 0.14)
    return c, yy, xx, fov_r, rr, rr <= 1.0, side, (disc_x, disc_y, disc_rx, disc_ry), (mac_x, mac_y, mac_sigma)


def make_fundus_case(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fundus photograph (RGB uint8) and its label (uint8: 0 background, 1 vessel, 2 optic disc, which
    wins inside the disc); 0 outside the field of view in both. All randomness comes from ``rng``."""
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    s = size / 256.0
    c, yy, xx, fov_r, rr, fov, side, (disc_x, disc_y, disc_rx, disc_ry), (mac_x, mac_y, mac_sigma) = \
        fundus_anatomy(rng, size)

    # background: base colour x vignette x broad blobs x texture
    base = np.array([rng.uniform(0.72, 0.88), rng.uniform(0.27, 0.36), rng.uniform(0.08, 0.15)])
    illum = 1.0 - rng.uniform(0.25, 0.45) * rr**2.5
    illum += 0.06 * (((xx - c) * rng.normal() + (yy - c) * rng.normal()) / fov_r)  # tilt
    for _ in range(int(rng.integers(2, 5))):
        bx, by = c + fov_r * rng.uniform(-0.7, 0.7, size=2)
        bs = fov_r * rng.uniform(0.25, 0.5)
        illum += rng.uniform(-0.12, 0.12) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * bs * bs))
    illum += 0.05 * smooth_field(rng, size, 6)
    img = base[None, None, :] * illum[..., None]
    tex = smooth_field(rng, size, max(4, int(24 * s)))
    img *= 1.0 + np.array([0.04, 0.07, 0.08])[None, None, :] * tex[..., None]
    plain = img.copy()  # vessels are coloured relative to this, also on top of the disc

    # macula: darker, slightly browner spot
    mac = np.exp(-((xx - mac_x) ** 2 + (yy - mac_y) ** 2) / (2 * mac_sigma**2))
    img *= 1.0 - rng.uniform(0.25, 0.4) * mac[..., None] * np.array([0.8, 1.0, 0.9])

    # optic disc: bright yellowish ellipse with soft rim and paler cup; label uses the crisp ellipse
    ell = np.hypot((xx - disc_x) / disc_rx, (yy - disc_y) / disc_ry)
    soft = np.clip((1.0 - ell) * disc_ry / (2.0 * s) + 0.5, 0.0, 1.0)
    halo = np.exp(-np.maximum(ell - 1.0, 0.0) ** 2 / 0.15) * (ell > 1.0)
    img *= 1.0 + 0.12 * halo[..., None]
    disc_col = np.array([0.98, 0.78, 0.42]) * rng.uniform(0.9, 1.0)
    cup = np.clip((rng.uniform(0.3, 0.45) - ell) * disc_ry / (3.0 * s) + 0.5, 0.0, 1.0)
    disc_col = disc_col[None, None, :] * (1.0 + 0.04 * smooth_field(rng, size, 8)[..., None])
    disc_col = disc_col + cup[..., None] * (np.array([1.0, 0.93, 0.72]) - disc_col) * 0.7
    img = img * (1.0 - soft[..., None]) + disc_col * soft[..., None]

    # vessels: veins darker than arteries; blended in with blurred anti-aliased coverage
    segs = grow_vessels(rng, size, c, fov_r, (disc_x, disc_y, disc_rx, disc_ry),
                         (mac_x, mac_y, 0.7 * mac_sigma), side)
    cov, vmask = rasterise(segs, size)
    art = blur121(cov[0])[..., None]
    vein = blur121(cov[1])[..., None]
    img = img * (1.0 - art) + plain * np.array([0.72, 0.5, 0.6]) * art
    img = img * (1.0 - vein) + plain * np.array([0.56, 0.34, 0.42]) * vein

    img += rng.normal(0.0, 0.012, size=img.shape)
    img = np.clip(img, 0.0, 1.0)
    image = np.round(img * 255.0).astype(np.uint8)
    image[~fov] = 0

    label = np.zeros((size, size), dtype=np.uint8)
    label[vmask] = LABELS["vessel"]
    label[ell <= 1.0] = LABELS["optic_disc"]
    label[~fov] = 0
    return image, label


# --------------------------------------------------------------------------------------------------
# dataset writing
# --------------------------------------------------------------------------------------------------


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """nnU-Net raw folder name for an id and name, e.g. ``(999, "DemoFundus") -> "Dataset999_DemoFundus"``."""
    if not isinstance(dataset_id, int) or isinstance(dataset_id, bool) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an int in 1..999 (nnU-Net uses 3 digits), got {dataset_id!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"dataset name must match {_NAME_RE.pattern} (letters, digits, '_', '-'), got {name!r}")
    return f"Dataset{dataset_id:03d}_{name}"


def case_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """Independent generator per case, keyed by (seed, split, index): counts never shift content."""
    return np.random.default_rng(np.random.SeedSequence([seed, split, index]))


def _existing(raw_root: Path, dataset_id: int, target: Path, record_key: str, record: dict) -> bool:
    """True if ``target`` already holds exactly the requested dataset (``dataset.json[record_key] == record``: it is
    complete, as it was renamed into place whole); raise if the id is taken otherwise."""
    for other in sorted(raw_root.glob(f"Dataset{dataset_id:03d}_*")):
        if other != target:
            raise FileExistsError(f"{other} already uses dataset id {dataset_id}; pick another id or delete that "
                                  f"folder")
    if not target.exists():
        return False
    try:
        existing = json.loads((target / "dataset.json").read_text()).get(record_key)
    except (OSError, ValueError, AttributeError):
        existing = None
    if existing == record:
        return True
    raise FileExistsError(f"{target} already exists and is not this dataset (other data or parameters); pick another "
                          f"id or delete that folder")


def save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def write_generated_dataset(raw_root: str | Path, dataset_id: int, name: str,
                            make_case: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
                            channel_names: dict, labels: dict, description: str, record_key: str, record: dict,
                            case_prefix: str) -> Path:
    """Write generated cases as the nnU-Net raw dataset ``raw_root/DatasetXXX_<name>`` (the demo's and the benchmarks'
    families) and return it. Case ``i`` of split ``s`` is ``make_case(case_rng(seed, s, i), size)``, so the same
    ``record`` (stored as ``dataset.json[record_key]``) gives the same bytes. Built in a temporary sibling and renamed:
    never half-written. A folder with the same record is reused; another one with this id raises FileExistsError.
    """
    folder_name = dataset_folder_name(dataset_id, name)
    num_train, num_test, size, seed = (record[key] for key in ("num_train", "num_test", "size", "seed"))
    if num_train < 1 or num_test < 0:
        raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
    raw_root = Path(raw_root)
    target = raw_root / folder_name
    if _existing(raw_root, dataset_id, target, record_key, record):
        logger.info("Reusing existing dataset %s", target)
        return target
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f".tmp_{folder_name}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        train = [f"{case_prefix}_{i:03d}" for i in range(num_train)]
        test = [f"{case_prefix}_test_{i:03d}" for i in range(num_test)]
        for split, (image_dir, label_dir, cases) in enumerate((("imagesTr", "labelsTr", train),
                                                               ("imagesTs", "labelsTs", test))):
            (tmp / image_dir).mkdir(parents=True)
            (tmp / label_dir).mkdir(parents=True)
            for index, case in enumerate(cases):
                image, label = make_case(case_rng(seed, split, index), size)
                save_png(image, tmp / image_dir / f"{case}_0000.png")
                save_png(label, tmp / label_dir / f"{case}.png")
        content = {"channel_names": channel_names, "labels": labels, "numTraining": num_train, "file_ending": ".png",
                   "name": name, "description": description, record_key: record}
        (tmp / "dataset.json").write_text(json.dumps(content, indent=4) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same dataset first: reuse it if identical, else raise
            if _existing(raw_root, dataset_id, target, record_key, record):
                return target
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Wrote %d training and %d test cases (%dx%d) to %s", num_train, num_test, size, size, target)
    return target


def write_demo_dataset(
    raw_root: str | Path,
    dataset_id: int = 999,
    name: str = "DemoFundus",
    num_train: int = 24,
    num_test: int = 6,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write the synthetic fundus dataset (one RGB PNG per case, grey label PNGs, ``imagesTs``/``labelsTs`` for the
    test split) to ``raw_root/DatasetXXX_Name`` as ``write_generated_dataset`` does, and return that folder."""
    record = {"version": GENERATOR_VERSION, "seed": int(seed), "size": int(size),
              "num_train": int(num_train), "num_test": int(num_test)}
    return write_generated_dataset(
        raw_root, dataset_id, name, make_fundus_case, {"0": "R", "1": "G", "2": "B"}, dict(LABELS),
        "Synthetic colour-fundus photographs with vessel and optic-disc labels, generated by nnunetv2.vit.demo_data "
        "for demos and tests (not real patient data).", "demo_generator", record, "fundus")
