"""HPA (fsseg.models.hpa): the PAM activation map, erasing and prototype tiling against a direct loop, the
Feature_Reweighting formula, and the base-class prototype bank against its definition computed by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.hpa import FeatureReweighting, HPAHead, PrototypeActivation, base_prototype_bank


def test_prototype_activation_is_the_relation_coding_of_each_prototype():
    torch.manual_seed(0)
    pam = PrototypeActivation(dim=6, hidden=8)
    q, protos = torch.randn(2, 6, 3, 4), torch.randn(2, 5, 6)
    got = pam(q, protos)
    coding = nn.Sequential(pam.hidden, nn.ReLU(), pam.out, nn.Sigmoid())  # the reference's Sequential, per prototype
    for p in range(5):
        tiled = protos[:, p, :, None, None].expand(-1, -1, 3, 4)
        torch.testing.assert_close(got[:, p], coding(torch.cat([q, tiled], dim=1))[:, 0], rtol=1e-5, atol=1e-6)


class _Enc(nn.Module):
    name, taps, mean, std = "stub", {"mid": [0]}, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    tap_channels = {"mid": 3, "high": 3, "low": 3}  # noqa: RUF012

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        f = x * self.w
        return {"mid": f, "high": f, "low": f}


def test_activation_erasing_and_tiled_prototypes_match_a_pixel_loop():
    torch.manual_seed(1)
    head = HPAHead(_Enc.tap_channels, num_base=4, reduce_dim=5, dropout=0.0)
    head.bank.copy_(torch.randn(4, 3))
    head.bank_ready.fill_(True)
    q = {k: torch.randn(2, 3, 4, 4) for k in ("mid", "high", "low")}
    s = {k: torch.randn(2, 1, 3, 4, 4) for k in ("mid", "high", "low")}
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    for training in (False, True):
        head.train(training)
        ctx = SimpleNamespace(class_idx=torch.tensor([2, 0]))
        out = head(q, s, mask, context=ctx)
        feat, proto = out["query_feat"], out["prototype"].flatten(1)
        bank = head.down_prototypes(head.bank[..., None, None])[..., 0, 0]
        for b in range(2):
            if training:
                c = int(ctx.class_idx[b])
                fg = [proto[b], bank[c]]
                bg = [bank[j] for j in range(4) if j != c]
            else:
                fg, bg = [proto[b]], list(bank)
            for y in range(4):
                for x in range(4):
                    a_fg = [float(head.activation(feat[b : b + 1, :, y : y + 1, x : x + 1], p[None, None])) for p in fg]
                    a_bg = [float(head.activation(feat[b : b + 1, :, y : y + 1, x : x + 1], p[None, None])) for p in bg]
                    erased = max(a_bg) > max(a_fg)
                    assert float(out["activation_map"][b, 0, y, x]) == pytest.approx(0.0 if erased else max(a_fg), abs=1e-6)
                    want = bg[int(np.argmax(a_bg))] if erased else fg[int(np.argmax(a_fg))]
                    torch.testing.assert_close(out["activated_prototypes"][b, :, y, x], want, rtol=1e-5, atol=1e-6)


def test_feature_reweighting_formula():
    torch.manual_seed(2)
    fr = FeatureReweighting()
    with torch.no_grad():
        fr.alpha.fill_(0.5)
    s, q = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)
    qf, sf = q.view(3, 4), s.view(3, 4)
    cross, self_ = sf @ qf.T, qf @ qf.T
    cross = (cross.max(1, keepdim=True).values - cross).softmax(1)
    self_ = (self_.max(1, keepdim=True).values - self_).softmax(1)
    want = ((self_ + 0.5 * cross) / 1.5) @ qf + qf
    torch.testing.assert_close(fr(s, q), want.view(1, 3, 2, 2))


class _Source:
    """Two base classes (ids 1, 2) of fold 0; novel class 3; three 8x8 images."""

    root = "/nowhere/toy"

    def __init__(self):
        g = np.random.default_rng(0)
        self.images = [g.integers(0, 255, (8, 8, 3)).astype(np.uint8) for _ in range(3)]
        self.labels = [np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 3, 3], [0, 0, 3, 3]], np.uint8),
                       np.array([[2, 2, 2, 2], [2, 2, 2, 2], [1, 1, 0, 0], [1, 1, 0, 0]], np.uint8),
                       np.zeros((4, 4), np.uint8)]  # fmt: skip
        self.labels = [np.kron(lab, np.ones((2, 2), np.uint8)) for lab in self.labels]

    def fold_classes(self, fold):
        return [1, 2], [3]

    def items(self, split):
        return list(range(3))

    def load(self, split, i):
        return self.images[i], self.labels[i]


def test_prototype_bank_is_the_image_mean_of_masked_averages(tmp_path):
    src, enc = _Source(), _Enc()
    bank = base_prototype_bank(src, 0, enc, "mid", size=8, cache_dir=tmp_path, eps=5e-4)

    # by hand: features = the image (0..1 scale); per image, mean over the class's pixels (area + eps); then the
    # mean over the images showing the class (class 1: images 0 and 1; class 2: image 1; image 2 shows none)
    def masked_mean(i, c):
        f = torch.as_tensor(src.images[i]).float().permute(2, 0, 1) / 255
        m = torch.as_tensor(src.labels[i] == c).float()
        return (f * m).sum((1, 2)) / (m.sum() + 5e-4)

    cls1 = (masked_mean(0, 1) + masked_mean(1, 1)) / 2
    cls2 = masked_mean(1, 2)
    torch.testing.assert_close(bank, torch.stack([cls1, cls2]), rtol=1e-4, atol=1e-5)
    files = list((tmp_path / "hpa_prototypes").glob("*.pt"))
    assert len(files) == 1
    with torch.no_grad():
        enc.w.fill_(2.0)  # other weights: another key, another file
    torch.testing.assert_close(base_prototype_bank(src, 0, enc, "mid", size=8, cache_dir=tmp_path), bank * 2, rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "hpa_prototypes").glob("*.pt"))) == 2
    with pytest.raises(ConfigError, match="taps 'mid', 'high' and 'low'"):
        HPAHead({"mid": 3}, num_base=2)
