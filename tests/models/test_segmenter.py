"""FewShotSegmenter's own logic: original-resolution scoring, optimiser groups and the poly schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fsseg.data import batch as B
from fsseg.data.transforms import EvalTransform
from fsseg.models.losses import CrossEntropy
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter


class TinyEncoder(nn.Module):
    tap_channels = {"mid": 6, "high": 4}

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(3, 6, 3, stride=4, padding=1)
        self.high = nn.Conv2d(6, 4, 1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        m = self.mid(x)
        return {"mid": m, "high": self.high(m)}


def tiny_model(**kw) -> FewShotSegmenter:
    return FewShotSegmenter(
        TinyEncoder(),
        lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=8),
        FeatureEnrichmentModule(dim=8, bins=(1.0, 0.5)),
        CrossEntropy(),
        **kw,
    )


def test_original_resolution_scoring_recovers_the_label():
    """A label pushed through the eval transform and back onto its original grid comes back (up to a thin edge)."""
    h, w, size = 90, 150, 64
    label = np.zeros((h, w), np.uint8)
    label[20:70, 30:100] = 1
    image = np.zeros((h, w, 3), np.uint8)
    tf = EvalTransform(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), size_divisor=1)
    _, masks, content = tf(image, [label])
    net_label = torch.as_tensor(masks[0]).long()
    logits = torch.stack([(net_label == 0).float(), (net_label == 1).float()])[None] * 10
    ori = torch.full((1, 100, 160), 255, dtype=torch.long)  # padded to a larger batch maximum with 255
    ori[0, :h, :w] = torch.as_tensor(label).long()
    batch = {B.QUERY_LABEL_ORI: ori, B.ORI_SIZE: torch.tensor([[h, w]]), B.CONTENT_SIZE: torch.tensor([list(content)])}
    mapped, target = tiny_model().score_logits(batch, logits)
    pred = mapped.argmax(1)[0, :h, :w]
    wrong = (pred != torch.as_tensor(label).long()).numpy()
    assert tuple(content) == (38, 64) and target is ori
    # one network pixel spans ~2.35 original pixels: errors may only sit within 3 pixels of the rectangle's edge
    near_edge = np.zeros((h, w), bool)
    near_edge[17:73, 27:103] = True
    near_edge[23:67, 33:97] = False
    assert wrong.any() == wrong[near_edge].any() and not wrong[~near_edge].any()
    assert wrong.mean() < 0.025


def test_param_groups_lr_and_poly_schedule():
    model = tiny_model(
        base_lr=0.0025, lr_multiplier=10.0, poly_power=0.9,
        param_groups=[{"match": r"^decoder\.cls\.", "base_lr": 1e-4, "lr_multiplier": 1.0, "schedule": "constant"}],
    )  # fmt: skip

    class T:  # the two trainer attributes configure_optimizers reads
        estimated_stepping_batches = 100

    model._trainer = T()
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 1e-4])
    cls_params = {id(p) for p in model.decoder.cls.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == cls_params
    for _ in range(50):
        opt.step()
        sched.step()
    # poly: lr = base * (1 - 50/100)^0.9 ; constant group unchanged
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025 * 0.5**0.9)
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-4)
    assert not any(id(p) in {id(q) for g in opt.param_groups for q in g["params"]} for p in model.encoder.parameters())


def test_kshot_forward_and_frozen_encoder_gets_no_gradient():
    torch.manual_seed(0)
    model = tiny_model()
    batch = {
        B.QUERY_IMG: torch.randn(2, 3, 32, 32),
        B.SUPPORT_IMGS: torch.randn(2, 5, 3, 32, 32),
        B.QUERY_MASK: torch.randint(0, 2, (2, 32, 32)),
        B.SUPPORT_MASKS: torch.randint(0, 2, (2, 5, 32, 32)),
    }
    out = model(batch)
    assert out["logits"].shape == (2, 2, 8, 8) and out["support_taps"]["mid"].shape == (2, 5, 6, 8, 8)
    model.main_loss(out["logits"], batch[B.QUERY_MASK]).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.head.down_query[0].weight.grad is not None
