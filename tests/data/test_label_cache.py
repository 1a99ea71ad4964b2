"""Issue 14, item 1: the label scan cache follows the labels, and episodes refuse a label without their class."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fsseg.data import batch as B
from fsseg.data.episodes import EvalEpisodes, TrainEpisodes
from fsseg.data.folds import build_fold_index, pixel_table
from fsseg.data.manifest import EpisodeManifest
from fsseg.data.sources import PascalVOC
from fsseg.data.transforms import EvalTransform, TrainTransform
from fsseg.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blank(path, value: int = 255) -> None:
    """Overwrite a label with one value everywhere (same size image), as the issue's all-255 edit."""
    h, w = np.asarray(Image.open(path)).shape[:2]
    Image.fromarray(np.full((h, w), value, np.uint8)).save(path)


def item(src: PascalVOC, split: str, name: str) -> int:
    return [n.rsplit("/", 1)[-1].split(".")[0] for n in src.item_names(split)].index(name)


def test_label_edited_after_the_first_scan_is_scanned_again(voc_copy, tmp_path):
    src = PascalVOC(voc_copy)
    before = build_fold_index(src, "train", 0, cache_dir=tmp_path, progress=False)
    t03 = item(src, "train", "t03")  # {7: 3000}
    assert t03 in before.class_items[7]
    lab = src.items("train")[t03][1]
    st = os.stat(lab)
    blank(lab)
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an edit a second later (coarse clocks)

    fresh = PascalVOC(voc_copy)
    after = build_fold_index(fresh, "train", 0, cache_dir=tmp_path, progress=False)
    assert after.path != before.path  # another key: the labels' stamps changed
    assert t03 not in after.class_items[7] and t03 not in after.items
    assert pixel_table(fresh, "train", tmp_path, progress=False).counts(t03) == {}
    assert len(list((tmp_path / "pixel_tables").iterdir())) == 2


def test_training_episode_with_a_support_edited_to_255_names_the_file(voc_copy, tmp_path):
    src = PascalVOC(voc_copy)
    index = build_fold_index(src, "train", 0, cache_dir=tmp_path, progress=False)  # built before the edit
    ds = TrainEpisodes(src, index, shots=1, transform=TrainTransform(48, MEAN, STD), seed=5)
    code = next(k for k in range(1000) if ds.draw(k)[1] == 7)
    _, _, (s,), _ = ds.draw(code)
    ds[code]  # fine before the edit
    blank(src.items("train")[s][1])
    with pytest.raises(DataError, match=rf"label .*{src.items('train')[s][1].name} \(support of a class-7 episode\) "
                                        r"holds no pixel of class 7"):  # fmt: skip
        ds[code]


def test_evaluation_episode_with_its_query_edited_names_the_file(voc_copy, tmp_path):
    src = PascalVOC(voc_copy)
    index = build_fold_index(src, "val", 0, cache_dir=tmp_path, progress=False)
    man = EpisodeManifest.draw(index, src.item_names("val"), dataset="pascal", root=str(src.root), shots=1,
                               seed=321, count=6, class_names=src.class_names)  # fmt: skip
    ds = EvalEpisodes(src, man, index.class_ids, src.fold_classes(0)[0], EvalTransform(48, MEAN, STD))
    q, c, _ = ds.episodes[0]
    assert int(ds[0][B.QUERY_MASK].eq(1).sum()) > 0  # fine before the edit
    blank(src.items("val")[q][1], value=0)  # the class painted over with background
    with pytest.raises(DataError, match=rf"\(query of a class-{c} episode\) holds no pixel of class {c}"):
        ds[0]
