"""Bad input fails in prepare_data/setup with a DataError/ConfigError naming the file, value or option."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from fsseg.data.datamodule import EpisodeDataModule
from fsseg.data.sources import COCO, FSS1000, PascalVOC
from fsseg.errors import ConfigError, DataError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def make(source, cache, **kw):
    args = dict(fold=0, shots=1, train_size=32, eval_size=32, mean=MEAN, std=STD, eval_episodes=10,
                val_episodes=5, cache_dir=str(cache))  # fmt: skip
    args.update(kw)
    return EpisodeDataModule(source, **args)


def prepare(root, tmp_path, **kw):
    dm = make(PascalVOC(root), tmp_path / "cache", **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def named(path) -> str:
    return re.escape(str(path))


def test_missing_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    with pytest.raises(DataError, match=f"dataset root {named(root)} does not exist"):
        prepare(root, tmp_path)


def test_missing_list_file(voc_copy, tmp_path):
    (voc_copy / "lists" / "train.txt").unlink()  # and no ImageSets/Segmentation to derive it from
    path = voc_copy / "lists" / "train.txt"
    with pytest.raises(DataError, match=f"list file {named(path)} does not exist"):
        prepare(voc_copy, tmp_path)


def test_missing_sbd_lists_when_deriving(voc_copy, tmp_path):
    (voc_copy / "lists" / "train.txt").unlink()
    seg = voc_copy / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("t00\n")
    (seg / "val.txt").write_text("v00\n")
    with pytest.raises(DataError, match=f"SBD list {named(voc_copy / 'SBD' / 'train.txt')} is missing"):
        prepare(voc_copy, tmp_path)


def test_malformed_list_line(voc_copy, tmp_path):
    path = voc_copy / "lists" / "val.txt"
    path.write_text(path.read_text() + "JPEGImages/v09.jpg\n")
    with pytest.raises(DataError, match=f"{named(path)}, line 10: 'JPEGImages/v09.jpg'"):
        prepare(voc_copy, tmp_path)


def test_image_without_mask(voc_copy, tmp_path):
    mask = voc_copy / "SegmentationClassAug" / "t03.png"
    mask.unlink()
    with pytest.raises(DataError, match=f"label file {named(mask)} for image .*t03.jpg does not exist"):
        prepare(voc_copy, tmp_path)


def test_fss_image_without_mask(tmp_path, builders):
    root = builders.write_fss(tmp_path / "fss", n_images=3)
    (root / "bear" / "2.png").unlink()
    dm = make(FSS1000(root), tmp_path / "cache", min_pixels=1, eval_split="test")
    mask = root / "bear" / "2.png"
    with pytest.raises(DataError, match=f"mask {named(mask)} for image .*2.jpg does not exist"):
        dm.prepare_data()


def test_mask_size_differs_from_image(voc_copy, tmp_path):
    mask = voc_copy / "SegmentationClassAug" / "v02.png"
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(mask)
    with pytest.raises(DataError, match=f"label {named(mask)} is 60x80 .* is 64x80; expected the same size"):
        prepare(voc_copy, tmp_path)


def test_unexpected_label_value(voc_copy, tmp_path):
    mask = voc_copy / "SegmentationClassAug" / "t05.png"
    label = np.array(Image.open(mask))
    label[5, 5] = 37
    label[6, 6] = 255
    Image.fromarray(label).save(mask)
    expected = f"label {named(mask)} holds unexpected value\\(s\\) 37; expected class ids 0..20"
    with pytest.raises(DataError, match=expected):
        prepare(voc_copy, tmp_path)


def test_unreadable_image(voc_copy, tmp_path):
    img = voc_copy / "JPEGImages" / "v04.jpg"
    img.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=f"image {named(img)} is unreadable"):
        prepare(voc_copy, tmp_path)


def test_truncated_jpeg(voc_copy, tmp_path):
    img = voc_copy / "JPEGImages" / "t07.jpg"
    data = img.read_bytes()
    img.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=f"cannot decode image {named(img)}.*truncated"):
        prepare(voc_copy, tmp_path)  # caught by the scan, before training
    with pytest.raises(DataError, match=f"cannot decode image {named(img)}"):
        PascalVOC(voc_copy).load("train", 7)  # and at load time


def test_class_with_too_few_images(voc_root, tmp_path):
    with pytest.raises(DataError, match=r"class 1 \(aeroplane\) has 3 qualifying image\(s\) in the pascal"):
        prepare(voc_root, tmp_path, shots=3)


def test_training_class_with_too_few_images(voc_root, tmp_path):
    from fsseg.data.episodes import TrainEpisodes
    from fsseg.data.folds import build_fold_index
    from fsseg.data.transforms import TrainTransform

    src = PascalVOC(voc_root)
    index = build_fold_index(src, "train", 0, cache_dir=tmp_path, progress=False)
    # keep filter, min_pixels 2048: base class 8 has 3 training images; 3 shots need 4
    with pytest.raises(DataError, match=r"class 8 \(cat\) has 3 qualifying image\(s\) in the pascal train"):
        TrainEpisodes(src, index, shots=3, transform=TrainTransform(32, MEAN, STD))


def test_fold_out_of_range(voc_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.fold=4 is out of range: PascalVOC has folds 0..3"):
        make(PascalVOC(voc_root), tmp_path, fold=4)
    with pytest.raises(ConfigError, match=r"fold=7"):
        PascalVOC(voc_root).fold_classes(7)
    with pytest.raises(ConfigError, match=r"data.fold=1 is out of range: FSS1000 has folds 0..0"):
        make(FSS1000(voc_root), tmp_path, fold=1)


def test_unknown_split_name(voc_root, tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_split='valid': expected one of \['val'\]"):
        make(PascalVOC(voc_root), tmp_path, eval_split="valid")
    with pytest.raises(ConfigError, match=r"unknown split 'trainval'"):
        PascalVOC(voc_root).items("trainval")


@pytest.mark.parametrize(
    "option, value, pattern",
    [
        ("shots", 0, r"data.shots=0: expected an integer >= 1"),
        ("train_filter", "filter", r"data.train_filter='filter'"),
        ("train_size", 0, r"data.train_size=0"),
        ("eval_size", -5, r"data.eval_size=-5"),
        ("eval_episodes", 0, r"data.eval_episodes=0"),
        ("min_pixels", -1, r"data.min_pixels=-1"),
        ("batch_size", 2.5, r"data.batch_size=2.5"),
        ("hflip_p", 2.0, r"hflip_p=2.0"),
    ],
)
def test_config_values_out_of_range(voc_root, tmp_path, option, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make(PascalVOC(voc_root), tmp_path, **{option: value})


def test_coco_missing_annotation_file(tmp_path):
    root = tmp_path / "coco"
    (root / "train2014").mkdir(parents=True)
    expected = root / "annotations" / "instances_train2014.json"
    with pytest.raises(DataError, match=f"COCO annotation file not found: expected {named(expected)}"):
        make(COCO(root), tmp_path / "cache").prepare_data()
    with pytest.raises(ConfigError, match="split_mode='stripes'"):
        COCO(root, split_mode="stripes")
    with pytest.raises(ConfigError, match="crowd='skip'"):
        COCO(root, crowd="skip")


def test_tampered_manifest_is_rejected_at_setup(voc_root, tmp_path):
    dm = prepare(voc_root, tmp_path)
    path = dm.eval_manifest.path
    d = json.loads(path.read_text())
    d["episodes"][0]["class_id"] = 2 if d["episodes"][0]["class_id"] != 2 else 3
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=f"episode manifest {named(path)} has been modified"):
        make(PascalVOC(voc_root), tmp_path / "cache").setup("test")
