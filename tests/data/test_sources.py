"""Dataset readers: published fold splits, native layouts, COCO masks, FSS-1000 binarisation."""

from __future__ import annotations

import numpy as np
import pytest

from fsseg.data.sources import COCO, FSS1000, VOC_CLASSES, PascalVOC
from fsseg.errors import DataError


# ------------------------------------------------------------------------------------------------ folds
def test_pascal_folds_match_pascal5i(voc_root):
    src = PascalVOC(voc_root)
    assert src.num_folds == 4 and src.num_classes == 20
    for i in range(4):
        base, novel = src.fold_classes(i)
        assert novel == [5 * i + 1, 5 * i + 2, 5 * i + 3, 5 * i + 4, 5 * i + 5]
        assert sorted(base + novel) == list(range(1, 21)) and not set(base) & set(novel)
    assert src.fold_classes(0)[1] == [1, 2, 3, 4, 5]  # aeroplane .. bottle
    names = [src.class_names[c - 1] for c in src.fold_classes(3)[1]]
    assert names == ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def test_coco_interleaved_and_contiguous_folds(coco_root):
    inter = COCO(coco_root, split_mode="interleaved")
    assert inter.num_classes == 80
    fold0 = [1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61, 65, 69, 73, 77]
    assert inter.fold_classes(0)[1] == fold0
    assert inter.fold_classes(3)[1] == list(range(4, 81, 4))
    novel_all = sorted(c for f in range(4) for c in inter.fold_classes(f)[1])
    assert novel_all == list(range(1, 81))
    contig = COCO(coco_root, split_mode="contiguous")
    assert contig.fold_classes(1)[1] == list(range(21, 41))
    assert contig.fold_classes(1)[0] == list(range(1, 21)) + list(range(41, 81))


def test_constructors_do_not_touch_the_disk(tmp_path):
    missing = tmp_path / "nope"
    for src in (PascalVOC(missing), COCO(missing), FSS1000(missing)):
        assert src.root == missing
    assert PascalVOC(missing).fold_classes(1)[1] == [6, 7, 8, 9, 10]  # default VOC classes need no files


# ------------------------------------------------------------------------------------------------ PASCAL
def test_pascal_items_and_load(voc_root, builders):
    VOC_TRAIN, VOC_VAL = builders.VOC_TRAIN, builders.VOC_VAL
    src = PascalVOC(voc_root)
    assert len(src.items("train")) == len(VOC_TRAIN) and len(src.items("val")) == len(VOC_VAL)
    assert src.item_names("train")[0] == "JPEGImages/t00.jpg"
    img, label = src.load("train", 0)
    assert img.dtype == np.uint8 and img.shape == (64, 80, 3)
    assert label.dtype == np.uint8 and label.shape == (64, 80)
    counts = np.bincount(label.ravel(), minlength=256)
    assert counts[6] == 2048 and counts[1] == 2047 and counts[255] == 40
    assert src.class_names == list(VOC_CLASSES)
    img, label = src.load("val", list(VOC_VAL).index("v08"))
    assert img.shape == (72, 56, 3) and label.shape == (72, 56)


def test_pascal_classes_txt(tmp_path, builders):
    names = [f"shape{k}" for k in range(8)]
    root = builders.write_voc(tmp_path / "synth", train={"a": {3: 100}}, val={"b": {1: 100}}, classes=names)
    src = PascalVOC(root)
    assert src.class_names == names and src.num_classes == 8
    assert src.fold_classes(1) == ([1, 2, 5, 6, 7, 8], [3, 4])
    (root / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=r"classes.txt lists 3 classes"):
        _ = PascalVOC(root).class_names


def _write_ids(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")


def test_pascal_derives_lists_from_voc_and_sbd(tmp_path, builders):
    root = builders.write_voc(tmp_path / "VOC2012", train={}, val={}, lists=False)
    seg = root / "ImageSets" / "Segmentation"
    _write_ids(seg / "train.txt", ["a", "b"])
    _write_ids(seg / "val.txt", ["d", "c"])
    _write_ids(root / "SBD" / "train.txt", ["b", "c", "e"])  # c is a VOC val image: excluded from train
    _write_ids(root / "SBD" / "val.txt", ["f"])
    src = PascalVOC(root)
    names = src.item_names("train")
    assert names == ["JPEGImages/a.jpg", "JPEGImages/b.jpg", "JPEGImages/e.jpg"]  # VOC train ∪ SBD train
    assert src.item_names("val") == ["JPEGImages/c.jpg", "JPEGImages/d.jpg"]
    line = (root / "lists" / "train.txt").read_text().splitlines()[0]
    assert line == "JPEGImages/a.jpg SegmentationClassAug/a.png"
    mtime = (root / "lists" / "train.txt").stat().st_mtime_ns
    PascalVOC(root).items("train")  # existing lists are reused, not rewritten
    assert (root / "lists" / "train.txt").stat().st_mtime_ns == mtime
    aug = PascalVOC(root, list_dir=tmp_path / "lists_aug", sbd_splits=("train", "val"))
    assert aug.item_names("train") == [f"JPEGImages/{i}.jpg" for i in ("a", "b", "e", "f")]  # trainaug


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_class_masks_crowd_ignore_overlap_and_ids(coco_root, builders):
    src = COCO(coco_root)  # crowd="ignore"
    src.prepare(["train", "val"])
    cls_of = {cid: k + 1 for k, cid in enumerate(builders.COCO_CAT_IDS)}
    assert cls_of[13] == 12 and cls_of[90] == 80
    img, label = src.load("train", 0)
    assert img.shape == (64, 80, 3) and label.dtype == np.uint8
    # big category-1 box (class 1) painted first, the smaller category-13 box (class 12) on top of it
    assert (label[21:29, 21:29] == 12).all()
    inside_big = np.zeros_like(label, bool)
    inside_big[1:39, 1:39] = True
    inside_big[19:31, 19:31] = False
    assert (label[inside_big] == 1).all()
    # crowd rows 35..59: ignored (255) where no object, objects untouched
    assert (label[41:59, :] == 255).all() and (label[36:39, 41:] == 255).all()
    assert (label[36:39, 1:39] == 1).all()
    assert (label[61:, :] == 0).all()
    _, label2 = src.load("train", 1)
    assert set(np.unique(label2)) == {0, 80}


def test_coco_crowd_background_policy_and_mask_cache(coco_root, tmp_path):
    src = COCO(coco_root, crowd="background", mask_dir=tmp_path / "masks")
    src.prepare(["train"])
    _, label = src.load("train", 0)
    assert 255 not in np.unique(label)
    assert (label[41:59, :] == 0).all()  # crowd skipped, as the reference implementations do
    mask = src.items("train")[0][1]
    assert mask.parent == tmp_path / "masks" / "train2014_crowd-background"
    mtime = mask.stat().st_mtime_ns
    COCO(coco_root, crowd="background", mask_dir=tmp_path / "masks").prepare(["train"])  # cached: not rebuilt
    assert mask.stat().st_mtime_ns == mtime


def test_coco_mask_missing_before_prepare(coco_root):
    with pytest.raises(DataError, match="has not been built"):
        COCO(coco_root).load("val", 0)


# ------------------------------------------------------------------------------------------------ FSS-1000
def test_fss_binarises_at_128_and_assigns_class_ids(fss_root, builders):
    src = FSS1000(fss_root)
    assert src.class_names == builders.FSS_CLASSES and src.ignore_index is None
    split = src.split_classes()  # 6 classes: round(3.12)=3 train, round(1.44)=1 val, 2 test, sorted order
    assert split == {"train": ["apple", "bear", "cactus"], "val": ["dolphin"], "test": ["eagle", "fig"]}
    assert src.fold_classes(0) == ([1, 2, 3], [4, 5, 6])
    assert src.split_class_ids(0, "test") == [5, 6]
    names = src.item_names("test")
    assert names[:3] == ["eagle/1.jpg", "eagle/2.jpg", "eagle/3.jpg"]
    for k in range(3):  # image n = k + 1; image 1's mask is an RGB PNG
        _, label = src.load("test", k)
        expected = np.where(builders.fss_mask(k + 1) >= 128, 5, 0)
        assert np.array_equal(label, expected)
        assert (label[0:4] == 0).all() and (label[4:8] == 5).all()  # 127 -> background, 128 -> foreground


def test_fss_split_files(tmp_path, builders):
    root = builders.write_fss(tmp_path / "fss", n_images=2)
    (root / "splits").mkdir()
    (root / "splits" / "trn.txt").write_text("fig\napple\n")
    (root / "splits" / "val.txt").write_text("bear\n")
    (root / "splits" / "test.txt").write_text("cactus\ndolphin\neagle\n")
    src = FSS1000(root)
    assert src.class_names == builders.FSS_CLASSES  # "splits" is not a class folder
    assert src.split_class_ids(0, "train") == [1, 6]
    assert src.fold_classes(0) == ([1, 6], [2, 3, 4, 5])
    assert len(src.items("test")) == 6


def test_paint_helper_is_exact(builders):
    label = builders.paint({3: 10, 4: 5}, (4, 10), tail=2)
    assert np.bincount(label.ravel(), minlength=256)[[0, 3, 4, 255]].tolist() == [23, 10, 5, 2]


def test_coco_prepare_reads_each_annotation_file_once(coco_root, tmp_path, monkeypatch):
    import json as json_module

    from fsseg.data.folds import pixel_table

    reads = []
    real_load = json_module.load
    monkeypatch.setattr(json_module, "load", lambda f, *a, **k: reads.append(f.name) or real_load(f, *a, **k))
    src = COCO(coco_root)
    src.prepare(["train", "val"])
    ann_dir = coco_root / "annotations"
    assert sorted(reads) == [str(ann_dir / f"instances_{s}2014.json") for s in ("train", "val")]
    table = pixel_table(COCO(coco_root), "train", tmp_path, progress=False)  # cached index + masks: no json
    assert len(reads) == 2
    assert table.counts(0)[12] == 100 and table.counts(1) == {80: 3000}
