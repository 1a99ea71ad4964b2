"""Fold index (min pixels, training filters, caching), training episodes, evaluation manifests."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from fsseg.data import batch as B
from fsseg.data.episodes import (
    EpisodeSampler,
    EvalEpisodes,
    TrainEpisodes,
    base_label,
    binary_mask,
    collate_episodes,
)
from fsseg.data.folds import build_fold_index, pixel_table
from fsseg.data.manifest import EpisodeManifest
from fsseg.data.sources import PascalVOC
from fsseg.data.transforms import EvalTransform, TrainTransform
from fsseg.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pos(builders, split: str, name: str) -> int:
    return list(builders.VOC_TRAIN if split == "train" else builders.VOC_VAL).index(name)


@pytest.fixture
def voc(voc_root):
    return PascalVOC(voc_root)


# ------------------------------------------------------------------------------------------------ fold index
def test_min_pixels_threshold_2047_vs_2048(voc, tmp_path, builders):
    idx = build_fold_index(voc, "train", 0, min_pixels=2048, cache_dir=tmp_path, progress=False)
    t02 = pos(builders, "train", "t02")  # class 7: 2048 pixels, class 8: 2047 pixels
    assert t02 in idx.class_items[7] and t02 not in idx.class_items[8]
    assert idx.item_classes[t02] == [7]
    low = build_fold_index(voc, "train", 0, min_pixels=2047, cache_dir=tmp_path, progress=False)
    assert t02 in low.class_items[8] and low.item_classes[t02] == [7, 8]


def test_train_filter_keep_and_drop(voc, tmp_path, builders):
    p = lambda n: pos(builders, "train", n)
    keep = build_fold_index(voc, "train", 0, train_filter="keep", cache_dir=tmp_path, progress=False)
    assert keep.class_ids == list(range(6, 21)) and keep.excluded_ids == [1, 2, 3, 4, 5]
    assert keep.dropped == [] and keep.num_total == 12
    assert keep.class_items[6] == sorted(p(n) for n in ("t00", "t01", "t06", "t09"))  # t00: novel class 1
    assert keep.class_items[8] == sorted(p(n) for n in ("t04", "t05", "t08"))
    assert p("t10") not in keep.items and len(keep.items) == 11  # t10 has no base class
    drop = build_fold_index(voc, "train", 0, train_filter="drop", cache_dir=tmp_path, progress=False)
    assert drop.dropped == sorted(p(n) for n in ("t00", "t04", "t10")) and drop.num_dropped == 3
    assert drop.class_items[6] == sorted(p(n) for n in ("t01", "t06", "t09"))
    assert drop.class_items[8] == sorted(p(n) for n in ("t05", "t08"))
    assert len(drop.items) == 9 and not set(drop.items) & set(drop.dropped)
    assert "dropped 3 images" in drop.summary()


def test_eval_index_uses_novel_classes_without_filter(voc, tmp_path, builders):
    idx = build_fold_index(voc, "val", 0, train_filter="drop", cache_dir=tmp_path, progress=False)
    assert idx.class_ids == [1, 2, 3, 4, 5] and idx.train_filter is None and idx.dropped == []
    assert idx.class_counts() == {1: 3, 2: 3, 3: 3, 4: 3, 5: 3}
    assert idx.item_classes[pos(builders, "val", "v00")] == [1]  # base class 6 is not an evaluation class


def test_pixel_table_and_fold_index_are_cached(voc_root, tmp_path, monkeypatch):
    src = PascalVOC(voc_root)
    table = pixel_table(src, "train", tmp_path, progress=False)
    assert table.counts(0) == {1: 2047, 6: 2048}
    first = build_fold_index(src, "train", 0, cache_dir=tmp_path, progress=False)

    def no_scan(*a, **k):
        raise AssertionError("labels re-scanned")

    src2 = PascalVOC(voc_root)
    monkeypatch.setattr(src2, "check_item", no_scan)
    again = build_fold_index(src2, "train", 0, cache_dir=tmp_path, progress=False)
    assert again.path == first.path and again.class_items == first.class_items
    other_fold = build_fold_index(src2, "train", 2, cache_dir=tmp_path, progress=False)  # reuses the table
    assert other_fold.path != first.path
    assert other_fold.class_ids == [c for c in range(1, 21) if not 11 <= c <= 15]
    assert len(list((tmp_path / "pixel_tables").iterdir())) == 1


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture
def train_ds(voc, tmp_path):
    idx = build_fold_index(voc, "train", 0, cache_dir=tmp_path, progress=False)
    tf = TrainTransform(48, MEAN, STD)
    return TrainEpisodes(voc, idx, shots=2, transform=tf, seed=5)


def test_training_supports_distinct_and_never_the_query(train_ds):
    idx = train_ds.index
    seen_classes = Counter()
    for code in range(4000):
        q, c, sup, _ = train_ds.draw(code)
        assert q not in sup
        assert len(set(sup)) == 2
        assert c in idx.item_classes[q]
        assert all(s in idx.class_items[c] for s in sup)
        seen_classes[c] += 1
    assert set(seen_classes) == {6, 7, 8, 9}


def test_training_episodes_are_deterministic(train_ds, voc, tmp_path):
    a = train_ds.draw(123)[:3]
    assert train_ds.draw(123)[:3] == a
    idx = build_fold_index(voc, "train", 0, cache_dir=tmp_path, progress=False)
    other = TrainEpisodes(voc, idx, shots=2, transform=TrainTransform(48, MEAN, STD), seed=5)
    x, y = train_ds[123], other[123]
    assert all(torch.equal(x[k], y[k]) for k in x)
    n = len(idx.items)
    draws = {tuple(train_ds.draw(3 + n * s)[2]) for s in range(20)}  # same query, other epochs
    assert len(draws) > 1


def test_episode_sampler_permutes_each_pass(train_ds):
    n = len(train_ds.index.items)
    sampler = EpisodeSampler(n, n, seed=1)
    e0 = list(sampler)
    assert sorted(c % n for c in e0) == list(range(n)) and [c // n for c in e0] == list(range(n))
    assert list(sampler) == e0
    sampler.set_epoch(1)
    e1 = list(sampler)
    assert sorted(c % n for c in e1) == list(range(n)) and e1 != e0
    longer = EpisodeSampler(n, 2 * n + 3, seed=1)  # more episodes than images: queries cycle evenly
    counts = Counter(c % n for c in longer)
    assert set(counts.values()) <= {2, 3} and sum(counts.values()) == 2 * n + 3


def test_training_item_matches_batch_contract(train_ds, builders):
    t00 = pos(builders, "train", "t00")  # classes 6 (2048 px, target) and novel 1 (2047 px)
    code = train_ds.index.items.index(t00)
    item = train_ds[code]
    assert item[B.QUERY_IMG].shape == (3, 48, 48) and item[B.QUERY_IMG].dtype == torch.float32
    assert item[B.SUPPORT_IMGS].shape == (2, 3, 48, 48) and item[B.SUPPORT_MASKS].shape == (2, 48, 48)
    for k in (B.QUERY_MASK, B.SUPPORT_MASKS, B.QUERY_BASE_LABEL, B.CLASS_ID, B.CLASS_IDX):
        assert item[k].dtype == torch.int64
    assert int(item[B.CLASS_ID]) == 6 and int(item[B.CLASS_IDX]) == 0  # base list 6..20
    qm, base = item[B.QUERY_MASK], item[B.QUERY_BASE_LABEL]
    assert set(qm.unique().tolist()) <= {0, 1, 255}
    assert set(item[B.SUPPORT_MASKS].unique().tolist()) <= {0, 1, 255}
    assert set(base.unique().tolist()) <= {0, 6, 255}  # novel class 1 -> 0
    assert torch.equal(qm == 1, base == 6) and torch.equal(qm == 255, base == 255)  # same spatial transform


def test_mask_helpers():
    label = np.array([[0, 1, 6], [255, 7, 21]], np.uint8)
    assert binary_mask(label, 6).tolist() == [[0, 0, 1], [255, 0, 0]]
    assert base_label(label, list(range(6, 21))).tolist() == [[0, 0, 6], [255, 7, 0]]
    assert binary_mask(label, 255, ignore_index=None).tolist() == [[0, 0, 0], [1, 0, 0]]


# ------------------------------------------------------------------------------------------------ manifests
@pytest.fixture
def val_index(voc, tmp_path):
    return build_fold_index(voc, "val", 0, cache_dir=tmp_path, progress=False)


def draw(voc, index, **kw):
    args = dict(dataset="pascal", root=str(voc.root), shots=1, seed=321, count=30,
                class_names=voc.class_names)  # fmt: skip
    args.update(kw)
    return EpisodeManifest.draw(index, voc.item_names("val"), **args)


def test_manifest_rule_cycles_over_pairs(voc, val_index):
    pairs = Counter((q, c) for q in val_index.items for c in val_index.item_classes[q])
    assert len(pairs) == 15  # 9 val images; v01..v05, v07 hold two novel classes
    names = voc.item_names("val")
    man = draw(voc, val_index, count=30)
    got = Counter((names.index(e.query), e.class_id) for e in man.episodes)
    assert got == Counter({p: 2 for p in pairs})  # 2 full passes: every (image, class) pair exactly twice
    first_pass = Counter((names.index(e.query), e.class_id) for e in man.episodes[:15])
    assert first_pass == Counter({p: 1 for p in pairs})
    for e in man.episodes:
        assert e.query not in e.supports and len(set(e.supports)) == len(e.supports) == 1
        assert all(names.index(s) in val_index.class_items[e.class_id] for s in e.supports)
    two = draw(voc, val_index, count=30, shots=2)
    assert [(e.query, e.class_id) for e in two.episodes] == [(e.query, e.class_id) for e in man.episodes]


def test_manifest_hash_determinism_reload_and_tamper(voc, val_index, tmp_path):
    a, b = draw(voc, val_index), draw(voc, val_index)
    assert a.hash == b.hash and len(a.hash) == 64
    assert draw(voc, val_index, seed=322).hash != a.hash
    assert draw(voc, val_index, shots=2).hash != a.hash
    path = tmp_path / "m.json"
    made = EpisodeManifest.load_or_create(path, val_index, voc.item_names("val"), dataset="pascal",
                                          root=str(voc.root), shots=1, seed=321, count=30)  # fmt: skip
    assert made.hash == a.hash and made.path == path and json.loads(path.read_text())["hash"] == a.hash
    again = EpisodeManifest.load_or_create(path, val_index, voc.item_names("val"), dataset="pascal",
                                           root=str(voc.root), shots=1, seed=321, count=30)  # fmt: skip
    assert again.hash == a.hash and again.episodes == a.episodes
    with pytest.raises(DataError, match="different parameters"):
        EpisodeManifest.load_or_create(path, val_index, voc.item_names("val"), dataset="pascal",
                                       root=str(voc.root), shots=1, seed=999, count=30)  # fmt: skip
    d = json.loads(path.read_text())
    d["episodes"][0]["supports"] = [d["episodes"][1]["query"]]
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"m\.json has been modified"):
        EpisodeManifest.load(path)


def test_manifest_class_with_too_few_images(voc, val_index):
    with pytest.raises(DataError, match=r"class 1 \(aeroplane\) has 3 qualifying image\(s\).*at least 4"):
        draw(voc, val_index, shots=3)


# ------------------------------------------------------------------------------------------------ eval items
def test_eval_items_keep_original_label_and_collate_pads(voc, val_index, builders):
    man = draw(voc, val_index, count=15)
    ds = EvalEpisodes(voc, man, [1, 2, 3, 4, 5], list(range(6, 21)), EvalTransform(44, MEAN, STD))
    names = voc.item_names("val")
    samples = []
    for e in range(len(ds)):
        item = ds[e]
        q = names.index(man.episodes[e].query)
        _, label = voc.load("val", q)
        c = man.episodes[e].class_id
        expected = np.where(label == 255, 255, (label == c).astype(np.int64))
        assert np.array_equal(item[B.QUERY_LABEL_ORI].numpy(), expected)  # exact original-resolution label
        assert item[B.ORI_SIZE].tolist() == list(label.shape)
        # 64x80 -> longer side 44 -> (35, 44) -> multiples of 8: (32, 40); the 72x56 image -> (40, 32)
        assert item[B.CONTENT_SIZE].tolist() == ([40, 32] if label.shape == (72, 56) else [32, 40])
        assert int(item[B.EPISODE_IDX]) == e and int(item[B.CLASS_IDX]) == c - 1
        assert item[B.QUERY_MASK].shape == (44, 44) and item[B.SUPPORT_IMGS].shape == (1, 3, 44, 44)
        samples.append(item)
    v08 = next(i for i, e in enumerate(man.episodes) if e.query.endswith("v08.jpg"))
    v00 = next(i for i, e in enumerate(man.episodes) if e.query.endswith("v00.jpg"))
    batch = collate_episodes([samples[v00], samples[v08]])
    ori = batch[B.QUERY_LABEL_ORI]
    assert ori.shape == (2, 72, 80) and ori.dtype == torch.int64
    assert (ori[0, 64:, :] == 255).all() and (ori[1, :, 56:] == 255).all()
    assert torch.equal(ori[0, :64, :80], samples[v00][B.QUERY_LABEL_ORI])
    assert batch[B.ORI_SIZE].tolist() == [[64, 80], [72, 56]]
    base = samples[v00][B.QUERY_BASE_LABEL]  # v00: novel 1 + base 6
    assert set(base.unique().tolist()) == {0, 6, 255}
