"""data.feature_cache: cached taps equal the encoder on the exact view, keys, resume, corruption, size limit."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from fsseg.data import batch as B
from fsseg.data import feature_cache as fc
from fsseg.data.episodes import CachedTrainEpisodes, TrainEpisodes, base_label, binary_mask
from fsseg.data.folds import build_fold_index
from fsseg.data.sources import PascalVOC
from fsseg.data.transforms import TrainTransform
from fsseg.errors import ConfigError
from fsseg.models.encoders import FrozenEncoder

SIZE = 48
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]}, output_stride=8,
                        weights="none", mean=MEAN, std=STD)  # fmt: skip
    return enc.eval()


class Counter:
    """Counts the images an encoder is called on (a forward pre-hook)."""

    def __init__(self, module):
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.images += int(args[0].shape[0])

    def close(self):
        self.handle.remove()


def transform(**kw):
    return TrainTransform(SIZE, MEAN, STD, **kw)


def build(voc_root, root, encoder, views=2, tf=None, **kw):
    cfg = fc.parse_config({"views": views, "chunk": 4, "batch": 5, **kw})
    return fc.prepare(PascalVOC(voc_root), "train", tf or transform(), encoder, cfg, root, progress=False)


def test_round_trip_equals_the_encoders_output_for_the_cached_view(voc_root, tmp_path, encoder):
    cache = build(voc_root, tmp_path, encoder, views=3)
    src, tf = PascalVOC(voc_root), transform()
    assert cache.num_images == 12 and cache.views == 3
    # high = index 3 = the first 112 channels of mid = cat(index 3, index 2): stored once
    assert cache.tap_shapes == {"mid": (152, 6, 6)} and cache.aliases == {"high": ("mid", 0, 112)}
    for item, view in [(0, 0), (5, 2), (11, 1)]:
        img, label = fc.render_view(src, "train", tf, 0, item, view)
        with torch.no_grad():
            exact = encoder(img[None])
        got = cache.taps(np.array([item]), np.array([view]))
        for tap, ref in exact.items():
            assert got[tap].dtype == torch.float16
            # fp16 rounding (relative 2^-11) plus batch-size-dependent float32 noise
            torch.testing.assert_close(got[tap].float(), ref, rtol=2e-3, atol=2e-3)
            assert not torch.equal(got[tap].float(), ref.half().float() * 0), "all-zero features"
        np.testing.assert_array_equal(cache.labels(np.array([item]), np.array([view]))[0], label)
    # the three views of an image are three different augmentations
    labs = cache.labels(np.array([3, 3, 3]), np.array([0, 1, 2]))
    taps = cache.taps(np.array([3, 3, 3]), np.array([0, 1, 2]))["mid"]
    assert not torch.equal(taps[0], taps[1]) and not torch.equal(taps[1], taps[2])
    assert not (np.array_equal(labs[0], labs[1]) and np.array_equal(labs[1], labs[2]))


def test_cached_episodes_draw_as_before_and_masks_match_the_view(voc_root, tmp_path, encoder):
    cache = build(voc_root, tmp_path, encoder, views=2)
    src, tf = PascalVOC(voc_root), transform()
    index = build_fold_index(src, "train", 0, min_pixels=2048, cache_dir=tmp_path / "idx")
    plain = TrainEpisodes(src, index, 1, tf, seed=3)
    cached = CachedTrainEpisodes(src, index, 1, tf, cache, seed=3)
    seen_views = set()
    for code in range(len(index.items) * 2):
        a, b = plain[code], cached[code]
        assert int(a[B.CLASS_ID]) == int(b[B.CLASS_ID]) and int(a[B.CLASS_IDX]) == int(b[B.CLASS_IDX])
        assert B.QUERY_IMG not in b and B.SUPPORT_IMGS not in b
        q, c, sup, rng = cached.draw(code)
        views = rng.integers(2, size=2)
        seen_views.add(tuple(views))
        # independent expectation: the episode's masks transformed with the view's own augmentation
        img, label = src.load("train", q)
        _, (m, base) = tf(img, [binary_mask(label, c), base_label(label, index.class_ids)],
                          np.random.default_rng([0, q, int(views[0])]))  # fmt: skip
        assert torch.equal(b[B.QUERY_MASK], m) and torch.equal(b[B.QUERY_BASE_LABEL], base)
        simg, slab = src.load("train", sup[0])
        _, (sm,) = tf(simg, [binary_mask(slab, c)], np.random.default_rng([0, sup[0], int(views[1])]))
        assert torch.equal(b[B.SUPPORT_MASKS][0], sm)
        ref = cache.taps(np.array([q, sup[0]]), views)
        assert torch.equal(b[B.QUERY_TAP + "mid"], ref["mid"][0])
        assert b[B.SUPPORT_TAP + "high"].shape == (1, 112, 6, 6)
    assert len(seen_views) > 1  # views are drawn per episode


def test_key_change_rebuilds_and_same_key_reuses(voc_root, tmp_path, encoder, caplog):
    count = Counter(encoder)
    try:
        a = build(voc_root, tmp_path, encoder, views=2)
        assert count.images == 2 + 12 * 2  # layout probe (2 images) + every view
        count.images = 0
        again = build(voc_root, tmp_path, encoder, views=2)
        assert again.path == a.path and count.images == 2  # reused: only the layout probe
        count.images = 0
        b = build(voc_root, tmp_path, encoder, views=3)
        assert b.path != a.path and count.images == 2 + 12 * 3
        count.images = 0
        c = build(voc_root, tmp_path, encoder, views=2, tf=transform(blur_p=0.25))  # another augmentation
        assert c.path not in (a.path, b.path) and count.images == 2 + 12 * 2
        count.images = 0
        d = build(voc_root, tmp_path, encoder, views=2, seed=1)
        assert d.path not in (a.path, c.path) and count.images == 2 + 12 * 2
        # a folder whose recorded key differs (copied, edited) is rebuilt, and says so
        rec = json.loads((a.path / "complete.json").read_text())
        rec["key_dict"]["views"] = 5
        (a.path / "complete.json").write_text(json.dumps(rec))
        count.images = 0
        with caplog.at_level(logging.WARNING, logger="fsseg.data.feature_cache"):
            build(voc_root, tmp_path, encoder, views=2)
        assert count.images == 2 + 12 * 2
        assert "another key (differs in: views)" in caplog.text and "rebuilding" in caplog.text
    finally:
        count.close()


def test_other_weights_are_another_key(voc_root, tmp_path, encoder):
    a = build(voc_root, tmp_path, encoder)
    torch.manual_seed(1)
    other = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2], "high": [3]}, output_stride=8,
                          weights="none", mean=MEAN, std=STD).eval()  # fmt: skip
    assert build(voc_root, tmp_path, other).path != a.path


class Interrupt(Exception):
    pass


def _stop_after(n):
    def on_chunk(done):
        if done >= n:
            raise Interrupt(done)

    return on_chunk


def test_interrupted_build_resumes_and_gives_identical_files(voc_root, tmp_path, encoder, caplog):
    full = build(voc_root, tmp_path / "full", encoder)
    cfg = fc.parse_config({"views": 2, "chunk": 4, "batch": 5})
    src, tf = PascalVOC(voc_root), transform()
    with pytest.raises(Interrupt):
        fc.prepare(src, "train", tf, encoder, cfg, tmp_path / "part", progress=False, on_chunk=_stop_after(4))
    (folder,) = (tmp_path / "part" / "features").iterdir()
    assert not (folder / "complete.json").exists()
    assert json.loads((folder / "progress.json").read_text())["done"] == 4
    count = Counter(encoder)
    try:
        with caplog.at_level(logging.WARNING, logger="fsseg.data.feature_cache"):
            part = fc.prepare(src, "train", tf, encoder, cfg, tmp_path / "part", progress=False)
    finally:
        count.close()
    assert count.images == 2 + 8 * 2  # resumed: only the 8 images left
    assert "resuming an interrupted build at image 4 of 12" in caplog.text
    assert (part.path / "complete.json").exists() and part.path.name == full.path.name
    for name in [fc.LABEL_FILE, *(fc.FeatureCache.tap_file(t) for t in full.tap_shapes)]:
        assert (part.path / name).read_bytes() == (full.path / name).read_bytes(), name


def test_truncated_file_is_rebuilt(voc_root, tmp_path, encoder, caplog):
    cache = build(voc_root, tmp_path, encoder)
    f = cache.path / fc.FeatureCache.tap_file("mid")
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="fsseg.data.feature_cache"):
        again = build(voc_root, tmp_path, encoder)
    assert "corrupt or truncated" in caplog.text and "taps_mid.f16" in caplog.text
    assert (again.path / "taps_mid.f16").read_bytes() == good


def test_too_large_is_refused_before_writing(voc_root, tmp_path, encoder):
    with pytest.raises(ConfigError, match=r"data\.feature_cache\.max_gb=1e-06.*data\.feature_cache\.views"):
        build(voc_root, tmp_path, encoder, max_gb=1e-6)
    (folder,) = (tmp_path / "features").iterdir()
    assert not any(p.name.endswith((".json", ".f16", ".u8")) for p in folder.iterdir())


def test_unfrozen_encoder_is_refused(voc_root, tmp_path):
    enc = FrozenEncoder("tf_efficientnet_lite0", taps={"mid": [3, 2]}, weights="none", frozen=False)
    with pytest.raises(ConfigError, match="encoder.frozen=true"):
        build(voc_root, tmp_path, enc)


@pytest.mark.parametrize(
    "value, match",
    [({"views": 0}, r"views=0"), ({"view": 2}, r"unknown option\(s\) \['view'\]"), ({"max_gb": -1}, r"max_gb=-1"),
     (4, r"data.feature_cache=4")],
)  # fmt: skip
def test_bad_config(value, match):
    with pytest.raises(ConfigError, match=match):
        fc.parse_config(value)


def test_off_values():
    assert fc.parse_config(None) is None and fc.parse_config({"enabled": False, "views": 2}) is None
    assert fc.parse_config({"views": 2}).views == 2


def test_memmaps_are_not_pickled(voc_root, tmp_path, encoder):
    import pickle

    cache = build(voc_root, tmp_path, encoder)
    cache.labels(np.array([0]), np.array([0]))
    assert cache._maps is not None
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._maps is None
    assert np.array_equal(clone.labels(np.array([1]), np.array([1])), cache.labels(np.array([1]), np.array([1])))
