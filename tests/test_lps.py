"""fsseg-lps (where CELP's pseudo-masks land): the figures from hand-built maps, and the command on the small
embedded benchmark (report, JSON, a bad delta refused before any work)."""

from __future__ import annotations

import json

import pytest
import torch

from fsseg.cli.lps import main, overlap_counts, summarise
from fsseg.errors import ConfigError


def test_figures_match_hand_computation():
    t = lambda *v: torch.tensor(v, dtype=torch.bool)
    foreground = torch.stack([t(1, 1, 0, 0, 0, 0), t(0, 0, 0, 0, 0, 0)])
    novel = torch.stack([t(0, 1, 1, 0, 0, 0), t(0, 0, 0, 0, 1, 1)])
    unlabelled = torch.stack([t(1, 1, 1, 1, 0, 0), t(1, 1, 1, 1, 1, 0)])  # image 1's last novel pixel is labelled
    counts = overlap_counts(foreground, novel, unlabelled)
    assert counts["fg"].tolist() == [2, 0]
    assert counts["fg_novel"].tolist() == [1, 0]
    assert counts["unlabelled_novel"].tolist() == [2, 1]
    assert counts["union"].tolist() == [3, 1]
    r = summarise(counts, keep=t(1, 0))
    assert r["images"] == 2 and r["anchored"] == 1
    assert r["fg_pixels"] == pytest.approx(2.0)  # mean over anchored images only
    assert r["precision"] == pytest.approx(1 / 2)  # 1 of M^1's 2 pixels is novel
    assert r["chance"] == pytest.approx(3 / 9)  # 3 novel among 9 unlabelled pixels
    assert r["lift"] == pytest.approx(1.5)
    assert r["images_with_novel"] == 2 and r["touched"] == 1
    assert r["mean_iou"] == pytest.approx((1 / 3 + 0) / 2)  # the unanchored image scores 0


def test_command_on_the_embedded_benchmark(synth_root, tmp_path, capsys):
    out = tmp_path / "lps.json"
    common = [f"data.source.root={synth_root}", f"paths.cache_dir={tmp_path}", "encoder.weights=none", "data.train_size=64", "data.min_pixels=16"]
    main([*common, "--images", "30", "--batch", "4", "--deltas", "0.5", "0.9", "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["deltas"]) == {"0.5", "0.9"}
    lo, hi = report["deltas"]["0.5"], report["deltas"]["0.9"]
    assert lo["images"] == hi["images"] == 30
    assert 0 <= hi["anchored"] <= lo["anchored"] <= 30  # a higher delta can only shrink every N(i)
    assert lo["chance"] == hi["chance"] > 0  # the novel share of unlabelled pixels does not depend on delta
    assert 0 <= lo["precision"] <= 1 and lo["touched"] <= lo["images_with_novel"]
    assert "| 0.5 | " in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--deltas"):
        main([*common, "--deltas", "1.0"])
