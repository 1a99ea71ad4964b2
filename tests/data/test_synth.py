"""The procedural benchmark (fsseg-synth): layout, determinism, labels, idempotence, non-triviality."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fsseg.data import synth
from fsseg.data.synth import SynthParams, checksums, generate, is_complete, main

SMALL = dict(n_train=60, n_val=40)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    res = generate(out, SynthParams(seed=0, **SMALL), workers=1, log=lambda *_: None)
    assert res["status"] == "generated"
    return out


@pytest.fixture(scope="module")
def sums(bench) -> dict[str, str]:
    return checksums(bench)


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    lines = (root / "lists" / f"{split}.txt").read_text().splitlines()
    return [(root / a, root / b) for a, b in (ln.split() for ln in lines)]


def test_same_seed_is_byte_identical_on_any_worker_count(bench, sums, tmp_path):
    out = tmp_path / "b"
    generate(out, SynthParams(seed=0, **SMALL), workers=2, log=lambda *_: None)
    assert checksums(out) == sums


def test_other_seed_differs(sums, tmp_path):
    out = tmp_path / "c"
    generate(out, SynthParams(seed=1, **SMALL), workers=1, log=lambda *_: None)
    other = checksums(out)
    assert other.keys() == sums.keys()
    changed = [k for k in sums if k.endswith((".jpg", ".png")) and other[k] != sums[k]]
    assert len(changed) > 0.9 * (SMALL["n_train"] + SMALL["n_val"]) * 2


def test_layout_and_lists(bench, sums):
    assert is_complete(bench)
    assert (bench / "classes.txt").read_text().splitlines() == list(synth.CLASS_NAMES)
    for split, n in (("train", SMALL["n_train"]), ("val", SMALL["n_val"])):
        lines = (bench / "lists" / f"{split}.txt").read_text().splitlines()
        assert len(lines) == n
        for ln in lines:
            img, lab = ln.split()
            assert img.startswith("JPEGImages/") and img.endswith(".jpg")
            assert lab.startswith("SegmentationClassAug/") and lab.endswith(".png")
            assert Path(img).stem == Path(lab).stem
            assert (bench / img).is_file() and (bench / lab).is_file()
    n = SMALL["n_train"] + SMALL["n_val"]
    assert sum(k.startswith("JPEGImages/") for k in sums) == n
    assert sum(k.startswith("SegmentationClassAug/") for k in sums) == n
    assert not list(bench.parent.glob(".a.tmp-*"))  # temp folder renamed away


def test_label_values_and_sizes(bench):
    seen = Counter()
    for img, lab in _pairs(bench, "train") + _pairs(bench, "val"):
        im, lb = Image.open(img), Image.open(lab)
        assert im.mode == "RGB" and lb.mode == "L"
        assert im.size == lb.size
        w, h = im.size
        assert max(w, h) == 160 and 112 <= min(w, h) <= 160
        vals = set(np.unique(np.asarray(lb)).tolist())
        assert vals <= set(range(21)) | {255}, (lab, vals)
        seen.update(v for v in vals if 1 <= v <= 20)
    assert len(seen) >= 18  # nearly every class appears even in 100 images


def test_boundary_band_separates_every_object(bench):
    far = total = lonely = 0
    for _, lab in _pairs(bench, "train") + _pairs(bench, "val"):
        lb = np.asarray(Image.open(lab)).astype(np.int32)
        obj = (lb >= 1) & (lb <= 20)
        assert obj.any() and (lb == 255).any(), lab
        # no object pixel touches a different (non-ignore) label directly
        for a, b in ((lb[:, :-1], lb[:, 1:]), (lb[:-1, :], lb[1:, :])):
            touch = (a != b) & (a != 255) & (b != 255) & ((a > 0) | (b > 0))
            assert not touch.any(), lab
        # band components lie against object pixels (bar tiny slivers swallowed whole, e.g. a star tip
        # cut off by an occluder)
        n, comp = cv2.connectedComponents((lb == 255).astype(np.uint8), connectivity=8)
        near_obj = cv2.dilate(obj.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        for k in range(1, n):
            if not (near_obj & (comp == k)).any():
                lonely += int((comp == k).sum())
        # and it is a thin band: nearly all of it within 3 px of object pixels (thin tips may vanish in it)
        near3 = cv2.dilate(obj.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
        far += int(((lb == 255) & ~near3).sum())
        total += int((lb == 255).sum())
    assert far < 0.05 * total, (far, total)
    assert lonely < 0.02 * total, (lonely, total)


def test_boundary_band_unit():
    inst = np.zeros((12, 12), np.int16)
    inst[3:9, 3:9] = 1
    band = synth.boundary_band(inst, 3)
    # 3 pixels wide across every edge, straddling it; the object interior and far background are kept
    assert band[3:9, 2:5].all() and band[3:9, 8:11].all() and band[2:5, 3:9].all() and band[8:11, 3:9].all()
    assert not band[5:8, 5:8].any() and not band[:, :2].any() and not band[:, 11].any() and not band[0].any()
    assert not synth.boundary_band(np.zeros((5, 5), np.int16), 3).any()


def test_meta(bench):
    meta = json.loads((bench / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["params"]["seed"] == 0
    assert meta["params"]["n_train"] == SMALL["n_train"] and meta["counts"] == {"train": 60, "val": 40}
    assert meta["version"] == synth.VERSION
    assert meta["recommended_min_pixels"] == 512
    assert [c["name"] for c in meta["classes"]] == list(synth.CLASS_NAMES)
    assert meta["folds"]["2"] == [11, 12, 13, 14, 15]
    nov = meta["novel_in_train"]
    assert set(nov) == {"0", "1", "2", "3"}
    for f in nov.values():
        assert 0 <= f["frac_novel_objects_in_base_images"] <= 1
    assert sum(f["novel_objects_in_base_images"] for f in nov.values()) > 0
    assert meta["stats"]["val"]["images"] == 40


def test_class_table_is_not_single_cue():
    specs = synth._CLASS_SPECS
    assert len(specs) == 20 and len({(s, t) for s, t, _ in specs}) == 20
    shapes = Counter(s for s, _, _ in specs)
    textures = Counter(t for _, t, _ in specs)
    hues = Counter(h for _, _, hs in specs for h in hs)
    assert min(shapes.values()) >= 3 and min(textures.values()) >= 4 and min(hues.values()) >= 4
    for f in range(4):  # each fold's novel classes share shape or texture with base classes
        novel = set(synth.fold_classes(f))
        for c in novel:
            s, t, _ = specs[c - 1]
            base = [specs[b - 1] for b in range(1, 21) if b not in novel]
            assert any(bs == s for bs, _, _ in base) and any(bt == t for _, bt, _ in base)


def test_render_is_deterministic():
    p = SynthParams(seed=5, **SMALL)
    a = synth.render_image(p, "val", 3)
    b = synth.render_image(p, "val", 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = synth.render_image(p, "train", 3)
    assert not np.array_equal(a[0], c[0]) if a[0].shape == c[0].shape else True


def test_incomplete_output_is_regenerated(bench, sums, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(bench, out)
    (out / synth.COMPLETE_MARKER).unlink()
    assert not is_complete(out)
    res = generate(out, SynthParams(seed=0, **SMALL), workers=1, log=lambda *_: None)
    assert res["status"] == "generated" and checksums(out) == sums


def test_interrupted_run_leaves_no_finished_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth._work

    def flaky(task):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(synth, "_work", flaky)
    out = tmp_path / "e"
    with pytest.raises(KeyboardInterrupt):
        generate(out, SynthParams(seed=0, **SMALL), workers=1, log=lambda *_: None)
    assert not out.exists() and not is_complete(out)
    assert not list(tmp_path.glob(".e.tmp-*"))
    # a killed run's leftover temp folder (dead pid) is never mistaken for output and gets cleaned
    stale = tmp_path / ".e.tmp-999999999"
    (stale / "JPEGImages").mkdir(parents=True)
    assert not is_complete(out)
    synth._remove_stale_tmp(out)
    assert not stale.exists()


def test_cli_idempotent_then_refuses_other_params(bench, sums, tmp_path, capsys):
    out = tmp_path / "f"
    shutil.copytree(bench, out)
    argv = ["--out", str(out), "--seed", "0", "--train", "60", "--val", "40", "--workers", "1"]
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "already" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == mtime
    assert main(argv[:-4] + ["--val", "41", "--workers", "1"]) == 2  # other parameters: refused
    assert "--force" in capsys.readouterr().err
    assert main(["--out", str(out), "--seed", "1", "--train", "60", "--val", "40", "--workers", "1"]) == 2
    assert checksums(out) == sums
    assert main(["--out", str(out), "--train", "5", "--val", "3", "--workers", "1", "--force"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["counts"] == {"train": 5, "val": 3}


def test_cli_refuses_foreign_directory(tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    assert main(["--out", str(out), "--train", "2", "--val", "2", "--workers", "1"]) == 2
    assert (out / "precious.txt").exists()


def test_colour_alone_does_not_give_classes_away(bench):
    res = synth.colour_cue_iou(bench, "train")
    s = res["summary"]
    # oracle thresholds over the split: a single channel or the class mean colour finds almost nothing
    assert s["channel"]["max"] < 0.2, s
    assert s["mean_colour"]["mean"] < 0.1, s


@pytest.mark.slow
def test_default_size_within_budget(tmp_path):
    t0 = time.perf_counter()
    res = generate(tmp_path / "full", SynthParams(seed=0), workers=2, log=lambda *_: None)
    elapsed = time.perf_counter() - t0
    assert res["status"] == "generated"
    assert elapsed <= 60, f"default benchmark took {elapsed:.1f} s (budget 60 s on 2 cores)"
    stats = res["meta"]["stats"]
    assert stats["train"]["images"] == 4000 and stats["val"]["images"] == 1000
    assert min(c["images_ge_min_pixels"] for c in stats["val"]["per_class"]) >= 40
    for f in res["meta"]["novel_in_train"].values():
        assert f["frac_novel_objects_in_base_images"] > 0.1
