"""PFENet parts against hand computations, a loop implementation and the paper's parameter count."""

import pytest
import torch

from fsseg.errors import ConfigError
from fsseg.models.losses import CrossEntropy, DiceLoss
from fsseg.models.ops import masked_average_pool, max_cosine_prior, minmax_normalise
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead


def test_masked_average_pool_hand_computed():
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1 x 1 x 2 x 2
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    # (1 + 3) / (2 + 5e-4)
    assert masked_average_pool(feat, mask).item() == pytest.approx(4 / 2.0005)


def test_max_cosine_prior_matches_loop():
    g = torch.Generator().manual_seed(0)
    b, k, c, h, w = 2, 3, 5, 4, 3
    q = torch.randn(b, c, h, w, generator=g)
    s = torch.randn(b, k, c, h, w, generator=g)
    m = (torch.rand(b, k, 1, h, w, generator=g) > 0.4).float()
    got = max_cosine_prior(q, s, m)
    expected = torch.zeros(b, 1, h, w)
    for i in range(b):
        for shot in range(k):
            pri = torch.zeros(h, w)
            for y in range(h):
                for x in range(w):
                    best = -2.0
                    for yy in range(h):
                        for xx in range(w):
                            sv = s[i, shot, :, yy, xx] * m[i, shot, 0, yy, xx]
                            cos = torch.dot(q[i, :, y, x], sv) / (q[i, :, y, x].norm() * sv.norm() + 1e-7)
                            best = max(best, cos.item())
                    pri[y, x] = best
            pri = (pri - pri.min()) / (pri.max() - pri.min() + 1e-7)
            expected[i, 0] += pri / k
    assert torch.allclose(got, expected, atol=1e-5)


def test_minmax_normalise_range():
    x = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]]])
    assert torch.allclose(minmax_normalise(x), torch.tensor([[[[0.0, 0.25], [0.5, 1.0]]]]), atol=1e-6)


def test_learnable_parameters_match_pfenet_paper():
    # PFENet (TPAMI 2020) reports 10.8M learnable parameters with ResNet-50 (mid 1536 ch, high 2048 ch).
    head = PriorPrototypeHead({"mid": 1536, "high": 2048})
    dec = FeatureEnrichmentModule(bins=(60, 30, 15, 8))
    n = sum(p.numel() for p in [*head.parameters(), *dec.parameters()])
    assert round(n / 1e6, 1) == 10.8


def test_head_and_fem_shapes_kshot_and_spatial_prototype():
    head = PriorPrototypeHead({"mid": 12, "high": 8}, reduce_dim=16).eval()
    dec = FeatureEnrichmentModule(dim=16, bins=(1.0, 0.5, 0.25)).eval()
    q = {"mid": torch.randn(2, 12, 8, 8), "high": torch.randn(2, 8, 8, 8)}
    s = {"mid": torch.randn(2, 5, 12, 8, 8), "high": torch.randn(2, 5, 8, 8, 8)}
    masks = (torch.rand(2, 5, 32, 32) > 0.5).float()
    g = head(q, s, masks)
    assert g["prototype"].shape == (2, 16, 1, 1) and g["prior"].shape == (2, 1, 8, 8)
    # K-shot prototype = mean of the per-shot prototypes
    one = [head(q, {k: v[:, i : i + 1] for k, v in s.items()}, masks[:, i : i + 1])["prototype"] for i in range(5)]
    assert torch.allclose(g["prototype"], torch.stack(one).mean(0), atol=1e-6)
    out = dec(g)
    assert out["logits"].shape == (2, 2, 8, 8)
    assert [t.shape[-1] for t in out["inner_logits"]] == [8, 4, 2]
    # a spatial prototype map (APANet's expanded region prototypes) goes through the same decoder
    g2 = dict(g, prototype=torch.randn(2, 16, 8, 8))
    assert dec(g2)["logits"].shape == (2, 2, 8, 8)


def test_fem_rejects_bad_bins():
    with pytest.raises(ConfigError, match="decoder.bins"):
        FeatureEnrichmentModule(bins=(60, 0))


def test_cross_entropy_ignores_255():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1] = torch.tensor([[2.0, -2.0], [0.0, 0.0]])
    target = torch.tensor([[[1, 255], [255, 255]]])
    # only pixel (0,0): -log(softmax([0, 2])[1])
    expected = -torch.log_softmax(torch.tensor([0.0, 2.0]), 0)[1]
    assert CrossEntropy()(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_dice_hand_computed():
    logits = torch.zeros(1, 2, 1, 3)  # p_fg = 0.5 everywhere
    target = torch.tensor([[[1, 0, 255]]])
    # valid pixels: p = [0.5, 0.5, 0]; t = [1, 0, 0]; inter 0.5, den 1.0 + 1 -> 1 - (1 + 1)/(2 + 1)
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(1 - 2 / 3, rel=1e-6)


def test_fem_prior_scale_multiplies_the_prior():
    """decoder.prior_scale = s is the same FEM fed s * prior (HDMNet's x10 merge); s <= 0 is a config error."""
    torch.manual_seed(0)
    scaled = FeatureEnrichmentModule(dim=8, bins=[1.0, 0.5], prior_scale=10.0).eval()
    plain = FeatureEnrichmentModule(dim=8, bins=[1.0, 0.5]).eval()
    plain.load_state_dict(scaled.state_dict())
    g = {"query_feat": torch.randn(2, 8, 8, 8), "prototype": torch.randn(2, 8, 1, 1), "prior": torch.rand(2, 1, 8, 8)}
    out = scaled(g)["logits"]
    assert torch.allclose(out, plain({**g, "prior": 10.0 * g["prior"]})["logits"], atol=1e-6)
    assert not torch.allclose(out, plain(g)["logits"], atol=1e-4)
    with pytest.raises(ConfigError, match="decoder.prior_scale must be > 0"):
        FeatureEnrichmentModule(dim=8, prior_scale=0.0)
