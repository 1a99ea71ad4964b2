"""The training-free references: constant predictors and the cosine-prototype baseline's threshold tuning."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from fsseg.data import batch as B
from fsseg.models.baselines import (
    ConstantDecoder,
    CosineThresholdDecoder,
    MaskedPrototypeHead,
    tune_threshold,
)
from fsseg.models.losses import CrossEntropy
from fsseg.models.segmenter import FewShotSegmenter


class MaskEncoder(nn.Module):
    """Features that encode the image's first channel: fg pixels (value 1) -> [1, 0.3], bg (0) -> [0.3, 1]."""

    tap_channels: ClassVar[dict[str, int]] = {"mid": 2}

    def forward(self, x):
        fg = (x[:, :1] > 0.5).float()
        return {"mid": torch.cat([fg + 0.3 * (1 - fg), 0.3 * fg + (1 - fg)], dim=1)}


def episodes(n: int, size: int = 8):
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(n, size, size, generator=g) > 0.5).long()
    smasks = (torch.rand(n, 1, size, size, generator=g) > 0.5).long()
    return {
        B.QUERY_IMG: masks[:, None].float().expand(-1, 3, -1, -1),
        B.QUERY_MASK: masks,
        B.SUPPORT_IMGS: smasks[:, :, None].float().expand(-1, -1, 3, -1, -1),
        B.SUPPORT_MASKS: smasks,
        B.CLASS_IDX: torch.arange(n) % 2,
    }


def model(decoder) -> FewShotSegmenter:
    enc = MaskEncoder()
    return FewShotSegmenter(enc, MaskedPrototypeHead(enc.tap_channels, "mid"), decoder, CrossEntropy(),
                            num_eval_classes=2, eval_resolution="network")  # fmt: skip


def test_cosine_to_prototype_values():
    out = model(CosineThresholdDecoder(0.5))(episodes(2))
    # prototype = [1, 0.3]; cos with itself 1, with [0.3, 1]: 0.6 / 1.09
    cos = out["cosine"]
    fg = episodes(2)[B.QUERY_MASK] == 1
    assert torch.allclose(cos[fg], torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(cos[~fg], torch.tensor(0.6 / 1.09), atol=1e-5)


def test_tune_threshold_picks_a_separating_threshold():
    m = model(CosineThresholdDecoder(0.0))
    thresholds = [0.0, 0.3, 0.7, 0.99]
    best, scores = tune_threshold(m, [episodes(4)], thresholds, num_classes=2)
    # 0.0 and 0.3 call everything foreground (cos >= 0.55 everywhere); 0.99 keeps fg only at cos = 1
    assert best == 0.7 and scores[2] == 1.0 and scores[0] < 1.0


def test_constant_decoders():
    b = episodes(3)
    fg = model(ConstantDecoder(True))(b)["logits"].argmax(1)
    bg = model(ConstantDecoder(False))(b)["logits"].argmax(1)
    assert fg.eq(1).all() and bg.eq(0).all()
