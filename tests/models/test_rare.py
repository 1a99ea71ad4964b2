"""RARE (fsseg.models.rare): unidirectional refinement against a direct loop, the error-prone regions by hand,
the prototype-distance term on a case with one choice, the K-shot selection, and the output shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fsseg.data import batch as B
from fsseg.models.rare import (
    PrototypeDistanceLoss,
    RAREDecoder,
    RAREHead,
    UnidirectionalRefine,
    _closest_shot,
    error_prone_region,
    query_error_region_target,
)  # fmt: skip


def test_unidirectional_refine_matches_a_loop_over_channels_and_positions():
    torch.manual_seed(0)
    ref = UnidirectionalRefine(dim=3)
    s, q = torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    p, m = torch.randn(1, 3), (torch.rand(1, 1, 4, 5) > 0.4).float()
    got = ref(s, q, p, m)
    sm = s * m
    a_h, a_w = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 5)
    for c in range(3):
        rows = torch.tensor([[q[0, c, i].mean() * sm[0, c, j].mean() for j in range(4)] for i in range(4)])
        a_h[0, c] = rows.flatten().softmax(0).view(4, 4)  # softmax over all (hq, hs) pairs
        cols = torch.tensor([[sm[0, c, :, i].mean() * q[0, c, :, j].mean() for j in range(5)] for i in range(5)])
        a_w[0, c] = cols.flatten().softmax(0).view(5, 5)
    h1 = ref.res_h(a_h)
    h1 = ref.res_h_1(h1) + h1
    w1 = ref.res_w(a_w)
    w1 = ref.res_w_1(w1) + w1
    for c in range(3):
        want = h1[0, c] @ torch.full((4, 5), float(p[0, c])) @ w1[0, c]
        torch.testing.assert_close(got[0, c], want, rtol=1e-5, atol=1e-5)


def test_error_prone_regions_by_hand():
    mask = np.zeros((8, 8), np.float32)
    mask[1:3, 1:3] = 1  # a small object between the nearest samples (rows/cols 0 and 4) is lost entirely
    mask[4:8, 4:8] = 1  # a block covering the sample (4, 4): kept
    got = error_prone_region(torch.as_tensor(mask)[None, None], (2, 2))[0, 0].numpy()
    want = np.zeros((8, 8), np.float32)
    want[1:3, 1:3] = 1
    np.testing.assert_array_equal(got, want)
    target = torch.as_tensor(mask).long()[None]
    target[0, 0, 4] = 1  # a sampled foreground pixel whose block is otherwise background: gained background
    label, alpha = query_error_region_target(target, (2, 2))
    want_label = np.full((8, 8), 255)
    want_label[1:3, 1:3] = 1
    want_label[0:4, 4:8] = 0
    want_label[0, 4] = 255  # the sampled pixel itself agrees
    np.testing.assert_array_equal(label[0].numpy(), want_label)
    assert float(alpha) == pytest.approx(4 / (4 + 16 + 1), rel=1e-5)


def test_prototype_distance_term_with_a_single_choice():
    feat = torch.zeros(1, 2, 2, 2)
    feat[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # the only foreground pixel
    feat[0, :, 1, 1] = torch.tensor([1.0, 1.0])
    feat[0, :, 0, 1] = torch.tensor([0.0, 1.0])
    feat[0, :, 1, 0] = torch.tensor([0.0, 1.0])
    mask = torch.zeros(1, 2, 2, dtype=torch.long)
    mask[0, 0, 0] = 1
    # the random BG pixel is one of three; prototype = f+ / (1 + 5e-4): 1 - 1 + cos(f+, f-) + cos(P, f-)
    torch.manual_seed(0)
    out = PrototypeDistanceLoss()({"merged": feat}, {B.QUERY_MASK: mask}, None)["prototype_distance"]
    choices = [2 * float(torch.cosine_similarity(feat[0, :, 0, 0], f, 0)) / 3 for f in
               (feat[0, :, 0, 1], feat[0, :, 1, 0], feat[0, :, 1, 1])]  # fmt: skip
    assert any(float(out) == pytest.approx(c, abs=1e-5) for c in choices)
    empty = PrototypeDistanceLoss()({"merged": feat}, {B.QUERY_MASK: torch.zeros_like(mask)}, None)
    assert float(empty["prototype_distance"]) == 0.0  # no foreground: no term


def test_closest_shot_and_the_head_decoder_shapes():
    maps = torch.zeros(1, 2, 2, 1, 2)
    maps[0, 0, :, 0, 0], maps[0, 1, :, 0, 0] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    maps[0, 0, :, 0, 1], maps[0, 1, :, 0, 1] = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    query = torch.tensor([[[[0.1, 1.0]], [[1.0, 0.9]]]])  # pixel 0 ~ shot 1; pixel 1 ~ shot 0
    torch.testing.assert_close(_closest_shot(maps, query)[0, :, 0], torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    torch.manual_seed(0)
    head, dec = RAREHead({"mid": 6, "high": 4}, reduce_dim=8), RAREDecoder(dim=8, dilations=(1, 2, 3))
    q = {"mid": torch.randn(2, 6, 5, 5), "high": torch.randn(2, 4, 5, 5)}
    s = {"mid": torch.randn(2, 3, 6, 5, 5), "high": torch.randn(2, 3, 4, 5, 5)}
    g = head.eval()(q, s, (torch.rand(2, 3, 40, 40) > 0.5).float())
    assert g["merged"].shape == (2, 8, 5, 5) and g["activation"].shape == (2, 2, 5, 5) and g["beta"].shape == (2, 1, 1, 1)
    assert dec(g)["logits"].shape == (2, 2, 5, 5)
