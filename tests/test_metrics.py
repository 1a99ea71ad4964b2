"""FewShotIoU and aggregate_seeds against hand-computed values, a numpy reference and a 2-rank DDP run."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch

from fsseg import metrics as fm
from fsseg.metrics import FewShotIoU, aggregate_seeds

I = 255  # ignore


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def run(num_classes, preds, targets, classes, **kw):
    m = FewShotIoU(num_classes, **kw)
    m.update(torch.stack(preds), torch.stack(targets), torch.tensor(classes))
    return m.compute()


# ----------------------------------------------------------------- hand-computed
def test_ignore_pixels_are_not_scored():
    target = t([[1, 1, I],
                [0, 0, I]])  # fmt: skip
    pred = t([[1, 0, 1],
              [1, 0, 1]])  # fmt: skip
    # Scored pixels: the 4 on the left. TP=(0,0) FP=(1,0) FN=(0,1) TN=(1,1); the predicted 1s on the
    # ignored column count nowhere.  fg: I=1 U=3; bg: I=1 U=3.
    r = run(1, [pred], [target], [0])
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["fbiou"] == pytest.approx(1 / 3)
    assert r["fp_rate"] == pytest.approx(1 / 4)
    assert r["fn_rate"] == pytest.approx(1 / 4)
    assert r["episodes"] == 1
    # Changing the prediction on ignored pixels changes nothing.
    pred2 = pred.clone()
    pred2[:, 2] = 0
    assert run(1, [pred2], [target], [0])["miou"] == pytest.approx(1 / 3)


# Two 4x4 episodes of the same class.
# Large object: target = top two rows (8 px), prediction identical -> I=8, U=8 (IoU 1).
LARGE_T = t([[1] * 4, [1] * 4, [0] * 4, [0] * 4])
LARGE_P = LARGE_T.clone()
# Small object: target = pixel (3,3), prediction = pixel (0,0) -> I=0, U=2 (IoU 0).
SMALL_T = torch.zeros(4, 4, dtype=torch.int64)
SMALL_T[3, 3] = 1
SMALL_P = torch.zeros(4, 4, dtype=torch.int64)
SMALL_P[0, 0] = 1


def test_classwise_accumulation_is_not_the_per_episode_mean():
    r = run(1, [LARGE_P, SMALL_P], [LARGE_T, SMALL_T], [0, 0])
    # class IoU = (8 + 0) / (8 + 2) = 0.8; the mean of episode IoUs would be (1 + 0) / 2 = 0.5.
    assert r["miou"] == pytest.approx(0.8)
    assert r["class_iou"].tolist() == pytest.approx([0.8])
    # bg: large I=8 U=8; small: target bg 15 px, pred bg 15 px, I=14, U=16 -> 22/24.  fg 8/10.
    assert r["fbiou"] == pytest.approx((22 / 24 + 8 / 10) / 2)
    # 1 FP pixel and 1 FN pixel out of 32 scored.
    assert r["fp_rate"] == pytest.approx(1 / 32)
    assert r["fn_rate"] == pytest.approx(1 / 32)
    assert r["episodes"] == 2


def test_two_classes_and_unseen_class_is_nan():
    # Class 2 episode: target = left column (4 px); prediction = (0,0), (1,0) of it plus (0,3), (1,3).
    # I=2, U=6 -> 1/3.  FP=2, FN=2.
    tgt = torch.zeros(4, 4, dtype=torch.int64)
    tgt[:, 0] = 1
    prd = torch.zeros(4, 4, dtype=torch.int64)
    prd[0:2, 0] = 1
    prd[0:2, 3] = 1
    r = run(3, [LARGE_P, SMALL_P, prd], [LARGE_T, SMALL_T, tgt], [0, 0, 2])
    iou = r["class_iou"]
    assert iou.shape == (3,)
    assert iou[0].item() == pytest.approx(0.8)
    assert math.isnan(iou[1].item())  # class 1 never seen: NaN and not in the mean
    assert iou[2].item() == pytest.approx(1 / 3)
    assert r["miou"] == pytest.approx((0.8 + 1 / 3) / 2)
    # FB over all three episodes. bg: 8/8, 14/16, and class-2 ep: target bg 12, pred bg 12, I=10, U=14.
    # fg: 8/8, 0/2, 2/6.
    assert r["fbiou"] == pytest.approx(((8 + 14 + 10) / (8 + 16 + 14) + (8 + 0 + 2) / (8 + 2 + 6)) / 2)
    assert r["fp_rate"] == pytest.approx(3 / 48)
    assert r["fn_rate"] == pytest.approx(3 / 48)


def test_batches_accumulate_like_one_batch_and_reset():
    m = FewShotIoU(1)
    m.update(LARGE_P[None], LARGE_T[None], torch.tensor([0]))
    m.update(SMALL_P[None], SMALL_T[None], torch.tensor([0]))
    assert m.compute()["miou"] == pytest.approx(0.8)
    m.reset()
    m.update(SMALL_P[None], SMALL_T[None], torch.tensor([0]))
    assert m.compute()["miou"] == 0.0
    assert m.compute()["episodes"] == 1


def test_forward_returns_batch_value_and_accumulates():
    m = FewShotIoU(1)
    b1 = m(SMALL_P[None], SMALL_T[None], torch.tensor([0]))
    assert b1["miou"] == 0.0
    m(LARGE_P[None], LARGE_T[None], torch.tensor([0]))
    assert m.compute()["miou"] == pytest.approx(0.8)


def test_empty_union_counts_as_zero_like_the_references():
    # An episode with no foreground in label or prediction: U=0, class IoU 0 (references: I / (U + eps)).
    z = torch.zeros(1, 2, 2, dtype=torch.int64)
    r = run(1, [z[0]], [z[0]], [0])
    assert r["miou"] == 0.0
    assert r["fbiou"] == pytest.approx(0.5)  # bg 4/4, fg 0


def test_no_update_gives_nan():
    m = FewShotIoU(2)
    with pytest.warns(UserWarning):
        r = m.compute()
    assert math.isnan(r["miou"]) and math.isnan(r["fbiou"]) and math.isnan(r["fp_rate"])
    assert r["episodes"] == 0
    assert torch.isnan(r["class_iou"]).all()


# --------------------------------------------------------------------- logits
def test_logits_equal_hard_predictions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 9, 7, generator=g)
    target = torch.randint(0, 2, (6, 9, 7), generator=g)
    target[:, 0, :] = I
    cls = torch.tensor([0, 1, 2, 0, 1, 2])
    a = FewShotIoU(3)
    a.update(logits, target, cls)
    b = FewShotIoU(3)
    b.update(logits.argmax(1), target, cls)
    ra, rb = a.compute(), b.compute()
    for k in ("miou", "fbiou", "fp_rate", "fn_rate", "episodes"):
        assert ra[k] == rb[k]
    assert torch.equal(ra["class_iou"], rb["class_iou"])
    # bool and float hard predictions are accepted too
    c = FewShotIoU(3)
    c.update(logits.argmax(1).bool(), target, cls)
    assert c.compute()["miou"] == ra["miou"]


def test_logits_are_upsampled_bilinearly_before_argmax():
    # fg-bg logit difference on a 2x2 grid; bg logit 0.
    d = torch.tensor([[2.0, -3.0], [-3.0, -3.0]])
    logits = torch.stack([torch.zeros(2, 2), d])[None]  # (1, 2, 2, 2)
    # Bilinear 2x2 -> 4x4, align_corners=False: source coords -0.25, 0.25, 0.75, 1.25, clamped to
    # 0, 0.25, 0.75, 1 -> per axis weights [a, .75a+.25b, .25a+.75b, b].
    # Row 0 along x: [2, 0.75, -1.75, -3]; row 1: -3 everywhere.
    # Output row 1 = .75*row0 + .25*row1: [0.75, -0.1875, ...]; rows 2, 3 are negative.
    # Foreground (d > 0): (0,0), (0,1), (1,0) - an L of 3 pixels.
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, 0, 0] = target[0, 0, 1] = target[0, 1, 0] = 1
    m = FewShotIoU(1)
    m.update(logits, target, torch.tensor([0]))
    assert m.compute()["miou"] == 1.0
    # argmax first then nearest upsampling would give the 2x2 block: IoU 3/4.
    h = FewShotIoU(1)
    h.update(logits.argmax(1), target, torch.tensor([0]))
    assert h.compute()["miou"] == pytest.approx(3 / 4)


def test_hard_predictions_are_upsampled_nearest():
    pred = t([[1, 0],
              [0, 1]])[None]  # fmt: skip
    # nearest 2x2 -> 4x4: each pixel becomes a 2x2 block; target = the top-left block + pixel (0,2).
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, :2, :2] = 1
    target[0, 0, 2] = 1
    # fg I = 4 (top-left block), U = 4 + 1 (FN (0,2)) + 4 (FP bottom-right block) = 9
    m = FewShotIoU(1)
    m.update(pred, target, torch.tensor([0]))
    assert m.compute()["miou"] == pytest.approx(4 / 9)


# ----------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "pred,target,cls,match",
    [
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([3]), "class_idx 3"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([-1]), "class_idx -1"),
        (torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7), torch.tensor([0]), "target value 7"),
        (torch.full((1, 2, 2), 2.0), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0]), "value 2"),
        (torch.zeros(2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0]), "batch size 2"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0, 1]), r"\(2,\)"),
        (torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0]), r"3, 2, 2\)"),
        (torch.zeros(2, 2), torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([0]), r"\(2, 2\)"),
        (torch.zeros(1, 2, 2), torch.zeros(2, 2, dtype=torch.long), torch.tensor([0]), r"\(2, 2\)"),
        (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.tensor([0]), "float32"),
    ],
)
def test_invalid_inputs_raise_naming_the_value(pred, target, cls, match):
    m = FewShotIoU(3)
    with pytest.raises(ValueError, match=match):
        m.update(pred, target, cls)


def test_invalid_constructor_args():
    with pytest.raises(ValueError, match="num_classes"):
        FewShotIoU(0)
    with pytest.raises(ValueError, match="ignore_index"):
        FewShotIoU(2, ignore_index=1)


# ---------------------------------------------------------- numpy reference
def numpy_reference(preds, targets, classes, num_classes, ignore=255):
    """Independent implementation: a plain loop, PFENet-style 2-bin histograms per episode."""
    inter = {}
    union = {}
    fb_i = np.zeros(2)
    fb_u = np.zeros(2)
    fp = fn = scored = 0
    for p, tg, c in zip(preds, targets, classes):
        p = p.copy()
        p[tg == ignore] = ignore
        keep = tg != ignore
        same = p[keep][p[keep] == tg[keep]]
        a_i = np.histogram(same, bins=2, range=(0, 1))[0]
        a_p = np.histogram(p[keep], bins=2, range=(0, 1))[0]
        a_t = np.histogram(tg[keep], bins=2, range=(0, 1))[0]
        a_u = a_p + a_t - a_i
        inter[c] = inter.get(c, 0) + a_i[1]
        union[c] = union.get(c, 0) + a_u[1]
        fb_i += a_i
        fb_u += a_u
        fp += int(((p == 1) & (tg == 0)).sum())
        fn += int(((p == 0) & (tg == 1)).sum())
        scored += int(keep.sum())
    class_iou = np.full(num_classes, np.nan)
    for c, i in inter.items():
        class_iou[c] = i / union[c] if union[c] else 0.0
    return {
        "miou": float(np.nanmean(class_iou)),
        "fbiou": float(np.mean(fb_i / fb_u)),
        "fp_rate": fp / scored,
        "fn_rate": fn / scored,
        "class_iou": class_iou,
    }


def random_episodes(n, num_classes, size=(13, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    target = torch.randint(0, 2, (n, h, w), generator=g)
    # blobs of ignore and a varying amount of foreground per episode
    ign = torch.rand(n, h, w, generator=g) < 0.15
    target[ign] = 255
    logits = torch.randn(n, 2, h, w, generator=g)
    logits[:, 1] += 2 * (target == 1).float() - 1  # correlated with the label
    cls = torch.randint(0, num_classes, (n,), generator=g)
    return logits, target, cls


def test_matches_numpy_reference_on_random_inputs():
    num_classes = 5
    logits, target, cls = random_episodes(40, num_classes - 1, seed=1)  # class 4 never appears
    m = FewShotIoU(num_classes)
    for s in range(0, 40, 7):  # uneven batches
        m.update(logits[s : s + 7], target[s : s + 7], cls[s : s + 7])
    r = m.compute()
    ref = numpy_reference(list(logits.argmax(1).numpy()), list(target.numpy()), cls.tolist(), num_classes)
    for k in ("miou", "fbiou", "fp_rate", "fn_rate"):
        assert r[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k
    np.testing.assert_allclose(r["class_iou"].numpy(), ref["class_iou"], rtol=1e-12)
    assert math.isnan(r["class_iou"][4].item())
    assert r["episodes"] == 40
    for k in ("miou", "fbiou", "fp_rate", "fn_rate"):
        assert 0.0 <= r[k] <= 1.0


# --------------------------------------------------------------------- DDP
def _ddp_worker(rank, world_size, init_file, out_dir, logits, target, cls, num_classes):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        m = FewShotIoU(num_classes)
        idx = torch.arange(rank, logits.shape[0], world_size)  # interleaved halves
        for s in range(0, len(idx), 3):
            j = idx[s : s + 3]
            m.update(logits[j], target[j], cls[j])
        torch.save(m.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_sum_to_single_process(tmp_path):
    import torch.multiprocessing as mp

    num_classes = 4
    logits, target, cls = random_episodes(22, num_classes, seed=3)
    single = FewShotIoU(num_classes)
    single.update(logits, target, cls)
    expected = single.compute()

    ctx = mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), logits, target, cls, num_classes),
        nprocs=2,
        join=False,
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish in 120 s")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k in ("miou", "fbiou", "fp_rate", "fn_rate", "episodes"):
            assert got[k] == expected[k], (rank, k)  # exact: the states are integer sums
        assert torch.equal(got["class_iou"].nan_to_num(-1), expected["class_iou"].nan_to_num(-1))
    assert expected["episodes"] == 22


# ------------------------------------------------------------ aggregate_seeds
def test_aggregate_seeds_hand_computed():
    r = aggregate_seeds([1.0, 2.0, 3.0])
    # mean 2, std sqrt(((1)^2 + 0 + 1^2) / 2) = 1, t_{0.975, 2} = 4.303
    assert r["n"] == 3
    assert r["mean"] == 2.0
    assert r["std"] == pytest.approx(1.0)
    assert r["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-3)


def test_aggregate_seeds_single_value_and_empty():
    r = aggregate_seeds([0.5])
    assert r["mean"] == 0.5 and r["std"] == 0.0 and r["n"] == 1 and math.isnan(r["ci95"])
    with pytest.raises(ValueError):
        aggregate_seeds([])


def test_t_quantile_fallback_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 41)) + [50, 100, 1000]:
        exact = scipy_stats.t.ppf(0.975, df)
        assert fm._t975(df, prefer_scipy=False) == pytest.approx(exact, abs=6e-4), df
        assert fm._t975(df) == pytest.approx(exact, rel=1e-12)


def test_t_quantile_fallback_table_values():
    assert fm._t975(2, prefer_scipy=False) == 4.303
    assert fm._t975(29, prefer_scipy=False) == 2.045
    assert fm._t975(10_000, prefer_scipy=False) == pytest.approx(1.96, abs=1e-3)


def test_aggregate_seeds_without_scipy_uses_the_table(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` -> ImportError
    r = aggregate_seeds([1.0, 2.0, 3.0])
    assert r["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-12)


def test_base_class_false_positives_by_hand():
    from fsseg.metrics import BaseClassFalsePositives

    m = BaseClassFalsePositives()
    pred = torch.tensor([[[1, 1, 0], [0, 1, 0]]])  # hard predictions
    base = torch.tensor([[[3, 0, 3], [7, 7, 255]]])  # base pixels: (0,0) (0,2) (1,0) (1,1); 255 ignored
    m.update(pred, base)  # predicted fg on (0,0) and (1,1): 2 of 4
    m.update(torch.ones(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))  # no base pixel
    out = m.compute()
    assert out["rate"].item() == 0.5 and int(out["pixels"]) == 4
    logits = torch.stack([torch.zeros(1, 2, 3), torch.tensor([[[1.0, -1, 1], [1, -1, 1]]])], dim=1)
    m.reset()
    m.update(logits, base)  # fg where channel 1 > 0: (0,0) (0,2) (1,0) of the base pixels
    assert m.compute()["rate"].item() == 0.75
    m.reset()
    assert torch.isnan(m.compute()["rate"])
