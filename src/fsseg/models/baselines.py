"""Training-free references evaluated through the same FewShotSegmenter path as the trained methods.

- ``MaskedPrototypeHead`` + ``CosineThresholdDecoder``: foreground where the cosine similarity between a query
  feature and the support's masked-average prototype exceeds a threshold (tuned on base classes with
  ``tune_threshold``). The classic prototype baseline every prototype method improves on.
- ``ConstantDecoder``: all-foreground or all-background predictions (how trivial is a benchmark?).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.ops import mask_to_feature, masked_average_pool


class MaskedPrototypeHead(nn.Module):
    """Masked-average support prototype of one encoder tap (no learnable parameters)."""

    def __init__(self, tap_channels: Mapping[str, int], tap: str = "mid") -> None:
        super().__init__()
        if tap not in tap_channels:
            raise ConfigError(f"MaskedPrototypeHead.tap {tap!r} is not an encoder tap; have {sorted(tap_channels)}")
        self.tap = tap

    def forward(self, query, support, support_mask):
        q, s = query[self.tap], support[self.tap]
        b, k = s.shape[:2]
        m = mask_to_feature(support_mask, q.shape[-2:]).flatten(0, 1)
        proto = masked_average_pool(s.flatten(0, 1), m).view(b, k, -1).mean(1)
        return {"query_feat": q, "prototype": proto[:, :, None, None]}


class CosineThresholdDecoder(nn.Module):
    """Logits [threshold, cos(query, prototype)]: argmax is foreground iff cos > threshold."""

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        if not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [-1, 1]; got {threshold}")
        self.threshold = float(threshold)

    def forward(self, guidance):
        cos = F.cosine_similarity(guidance["query_feat"], guidance["prototype"], dim=1, eps=1e-7)
        return {"logits": torch.stack([torch.full_like(cos, self.threshold), cos], dim=1), "cosine": cos}


class ConstantDecoder(nn.Module):
    """All-foreground (``foreground=True``) or all-background logits."""

    def __init__(self, foreground: bool) -> None:
        super().__init__()
        self.foreground = bool(foreground)

    def forward(self, guidance):
        q = guidance["query_feat"]
        logits = torch.zeros(q.shape[0], 2, *q.shape[-2:], device=q.device)
        logits[:, int(self.foreground)] = 1.0
        return {"logits": logits}


@torch.no_grad()
def tune_threshold(model: nn.Module, loader: Iterable, thresholds: Sequence[float], num_classes: int) -> tuple[float, list[float]]:
    """Pick the cosine threshold with the best class mIoU over ``loader``'s episodes (base classes).

    ``model`` is a FewShotSegmenter with CosineThresholdDecoder; one pass computes the cosine maps, every
    threshold is scored at once. Returns (best threshold, mIoU per threshold).
    """
    from fsseg.metrics import FewShotIoU

    metrics = [FewShotIoU(num_classes) for _ in thresholds]
    t = torch.tensor(list(thresholds)).view(-1, 1, 1, 1)
    model.eval()
    for batch in loader:
        cos = model(batch)["cosine"].unsqueeze(1)  # B, 1, h, w
        size = batch[B.QUERY_IMG].shape[-2:]
        cos = F.interpolate(cos, size=size, mode="bilinear", align_corners=True)[:, 0]
        logits, target = model.score_logits(batch, torch.stack([torch.zeros_like(cos), cos], 1))
        for m, thr in zip(metrics, t):
            pred = (logits[:, 1] > thr).long()
            m.update(pred, target, batch[B.CLASS_IDX])
    scores = [float(m.compute()["miou"]) for m in metrics]
    best = max(range(len(scores)), key=scores.__getitem__)
    return float(thresholds[best]), scores
