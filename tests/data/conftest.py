"""Fixtures that build tiny datasets in their native layouts (VOC/SBD, COCO instances json, FSS-1000).

Labels are painted in raster order: an entry {class: n} of an image spec paints the next n pixels (row-major)
with that class, so pixel counts are exact and hand-checkable; the last ``IGNORE_TAIL`` pixels of every VOC
label are 255 (like VOC's object boundaries).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

IGNORE_TAIL = 40
VOC_HW = (64, 80)

# Fold 0 of the 20-class tree: novel 1..5, base 6..20.
VOC_TRAIN = {
    "t00": {6: 2048, 1: 2047},  # novel class 1 present (below min_pixels): dropped by train_filter="drop"
    "t01": {6: 2500},
    "t02": {7: 2048, 8: 2047},  # 7 qualifies (exactly 2048), 8 does not (2047)
    "t03": {7: 3000},
    "t04": {8: 3000, 1: 500},  # novel pixels -> dropped by "drop"
    "t05": {8: 2600},
    "t06": {6: 2100, 7: 2100},
    "t07": {9: 3000},
    "t08": {9: 2500, 8: 2200},
    "t09": {6: 2200, 9: 2200},
    "t10": {1: 4000},  # novel only: never a training query; dropped by "drop"
    "t11": {7: 2300, 9: 2300},
}
VOC_VAL = {
    "v00": {1: 2048, 6: 2048},
    "v01": {1: 2500, 2: 2500},
    "v02": {2: 2100, 3: 2100},
    "v03": {3: 2200, 4: 2200},
    "v04": {4: 2300, 5: 2300},
    "v05": {5: 2400, 1: 2400},
    "v06": {2: 2600, 7: 2000},
    "v07": {3: 2500, 5: 2500},
    "v08": {4: 3000},
}
VOC_SIZES = {"v08": (72, 56)}  # one portrait image (H > W); the rest are 64 x 80

PALETTE = np.random.default_rng(7).integers(0, 256, size=(256, 3)).astype(np.uint8)


def paint(spec: dict[int, int], hw: tuple[int, int], tail: int = IGNORE_TAIL) -> np.ndarray:
    h, w = hw
    flat = np.zeros(h * w, np.uint8)
    off = 0
    for cls, n in spec.items():
        flat[off : off + n] = cls
        off += n
    assert off <= h * w - tail, "spec does not fit the image"
    if tail:
        flat[-tail:] = 255
    return flat.reshape(h, w)


def image_for(label: np.ndarray, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-10, 11, size=(*label.shape, 3))
    return np.clip(PALETTE[label].astype(int) + noise, 0, 255).astype(np.uint8)


def write_voc(root: Path, train=VOC_TRAIN, val=VOC_VAL, sizes=VOC_SIZES, lists: bool = True,
              classes: list[str] | None = None) -> Path:  # fmt: skip
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    for k, (name, spec) in enumerate({**train, **val}.items()):
        label = paint(spec, sizes.get(name, VOC_HW))
        Image.fromarray(image_for(label, k)).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        Image.fromarray(label).save(root / "SegmentationClassAug" / f"{name}.png")
    if lists:
        (root / "lists").mkdir(exist_ok=True)
        for split, spec in (("train", train), ("val", val)):
            lines = [f"JPEGImages/{n}.jpg SegmentationClassAug/{n}.png" for n in spec]
            (root / "lists" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


@pytest.fixture(scope="session")
def voc_root(tmp_path_factory) -> Path:
    """A read-only 20-class VOC tree (12 train, 9 val images). Tests must not modify it."""
    return write_voc(tmp_path_factory.mktemp("voc") / "VOC2012")


@pytest.fixture
def voc_copy(tmp_path) -> Path:
    """A private VOC tree a test may modify."""
    return write_voc(tmp_path / "VOC2012")


# ------------------------------------------------------------------------------------------------- COCO
COCO_SKIPPED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # real COCO leaves these category ids unused
COCO_CAT_IDS = [i for i in range(1, 91) if i not in COCO_SKIPPED_IDS]  # 80 ids; position + 1 = class id
COCO_HW = (64, 80)


def rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE (column-major run lengths, starting with a 0-run)."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def rect_poly(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(ann_id, image_id, category_id, segmentation, area, crowd=0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": area, "iscrowd": crowd}  # fmt: skip


def write_coco(root: Path, year: int = 2014) -> Path:
    """train: image 1 = big cat-1 rectangle + small cat-13 rectangle on top (listed first) + a crowd region of
    cat 1 overlapping the big one; image 2 = cat 90 (the last class). val: image 3 = cat 5."""
    h, w = COCO_HW
    crowd = np.zeros((h, w), np.uint8)
    crowd[35:60, :] = 1
    train = {
        "images": [
            {"id": 1, "file_name": f"COCO_train{year}_000000000001.jpg", "height": h, "width": w},
            {"id": 2, "file_name": f"COCO_train{year}_000000000002.jpg", "height": h, "width": w},
        ],
        "annotations": [
            ann(11, 1, 13, rect_poly(20, 20, 30, 30), 100.0),
            ann(10, 1, 1, rect_poly(0, 0, 40, 40), 1600.0),
            ann(12, 1, 1, rle_uncompressed(crowd), float(crowd.sum()), crowd=1),
            ann(20, 2, 90, rect_poly(10, 10, 70, 60), 3000.0),
        ],
        "categories": [{"id": c, "name": f"cat{c}", "supercategory": "x"} for c in COCO_CAT_IDS],
    }
    val = {
        "images": [{"id": 3, "file_name": f"COCO_val{year}_000000000003.jpg", "height": h, "width": w}],
        "annotations": [ann(30, 3, 5, rect_poly(0, 0, 50, 50), 2500.0)],
        "categories": train["categories"],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, data in (("train", train), ("val", val)):
        (root / "annotations" / f"instances_{split}{year}.json").write_text(json.dumps(data))
        (root / f"{split}{year}").mkdir(exist_ok=True)
        for k, im in enumerate(data["images"]):
            arr = np.random.default_rng(k).integers(0, 256, size=(h, w, 3)).astype(np.uint8)
            Image.fromarray(arr).save(root / f"{split}{year}" / im["file_name"], quality=95)
    return root


@pytest.fixture
def coco_root(tmp_path) -> Path:
    return write_coco(tmp_path / "coco")


# ------------------------------------------------------------------------------------------------- FSS-1000
FSS_CLASSES = ["apple", "bear", "cactus", "dolphin", "eagle", "fig"]  # ids 1..6 in this (sorted) order
FSS_HW = (32, 32)


def fss_mask(k: int) -> np.ndarray:
    """Gray mask: 127 in rows 0-3 (background), 128 in rows 4-7 (foreground), 255 in rows 8-15 (fg)."""
    m = np.zeros(FSS_HW, np.uint8)
    m[0:4] = 127
    m[4:8] = 128
    m[8 : 16 + k] = 255
    return m


def write_fss(root: Path, classes=FSS_CLASSES, n_images: int = 3) -> Path:
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for n in range(1, n_images + 1):
            m = fss_mask(n)
            img = np.random.default_rng(n).integers(0, 256, size=(*FSS_HW, 3)).astype(np.uint8)
            Image.fromarray(img).save(d / f"{n}.jpg", quality=95)
            if n == 1:  # FSS-1000 ships some masks as RGB PNGs
                Image.fromarray(np.stack([m] * 3, -1)).save(d / f"{n}.png")
            else:
                Image.fromarray(m).save(d / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def fss_root(tmp_path_factory) -> Path:
    return write_fss(tmp_path_factory.mktemp("fss") / "FSS-1000")


@pytest.fixture(scope="session")
def builders():
    """The builders and constants above, for tests (importing from conftest is fragile across folders)."""
    from types import SimpleNamespace

    names = ["IGNORE_TAIL", "VOC_HW", "VOC_TRAIN", "VOC_VAL", "VOC_SIZES", "paint", "image_for", "write_voc",
             "COCO_CAT_IDS", "COCO_HW", "write_coco", "FSS_CLASSES", "FSS_HW", "fss_mask",
             "write_fss"]  # fmt: skip
    return SimpleNamespace(**{n: globals()[n] for n in names})
