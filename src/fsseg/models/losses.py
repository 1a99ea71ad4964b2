"""Main losses (CE or Dice, ignore 255) and auxiliary-loss modules.

An auxiliary loss is a training-only module: ``forward(outputs, batch, model) -> dict[name, loss]`` reading the
forward's named intermediates and the batch (and, for branches such as APANet's, the model's shared parts).
The segmenter multiplies each by its configured ``weight``; none of them runs at inference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_MASK, SUPPORT_MASKS
from fsseg.errors import ConfigError
from fsseg.models.ops import upsample_logits

CHANNEL_REDUCTIONS = ("sum", "mean")  # DiceLoss: CyCTR's reference (sum over channels) | CELP_CyCTR's (mean)


class CrossEntropy(nn.Module):
    """Pixel-wise cross-entropy over {background, foreground}, label 255 ignored.

    ``ignore_as_background``: 255 pixels count as background instead (I2R's public code zeroes them in place
    before its losses, round2-references.md §1.2)."""

    def __init__(self, ignore_as_background: bool = False) -> None:
        super().__init__()
        self.ignore_as_background = bool(ignore_as_background)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(logits, target.shape[-2:])
        if self.ignore_as_background:
            target = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
        return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


class DiceLoss(nn.Module):
    """Dice loss on the softmax foreground probability; 255 pixels excluded.

    ``squared``: squared-sum denominator (CyCTR/SCCAN's weighted Dice) instead of the plain sum.
    ``sigmoid_both``: CyCTR's weighted Dice (model/loss.py): a sigmoid on EACH channel, channel c scored against
    (target == c), the two channel losses summed, then averaged over the batch. With ``squared``, ``smooth=0``
    and ``eps=1e-8`` it is the reference's loss, except that fsseg also zeroes the prediction on 255 pixels (the
    reference zeroes only the target there, so ignored pixels still enter the sum of p^2).
    ``channel_reduction``: how the per-(image, channel) losses become one number. ``sum`` (default): summed over
    the channels, averaged over the batch (CyCTR's ``weighted_dice_loss(reduction="sum")``: ``loss.sum() / n``).
    ``mean``: averaged over images and channels (CELP_CyCTR's copy of that loss, whose default is
    ``reduction="mean"``): with ``sigmoid_both`` (two channels) exactly half of ``sum``; one channel: equal.
    """

    def __init__(
        self,
        smooth: float = 1.0,
        squared: bool = False,
        sigmoid_both: bool = False,
        eps: float = 1e-8,
        channel_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if channel_reduction not in CHANNEL_REDUCTIONS:
            raise ConfigError(f"loss.channel_reduction must be one of {list(CHANNEL_REDUCTIONS)}; got {channel_reduction!r}")
        self.smooth, self.squared, self.sigmoid_both, self.eps = smooth, squared, sigmoid_both, eps
        self.channel_reduction = str(channel_reduction)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(logits, target.shape[-2:])
        valid = (target != IGNORE_INDEX).float()
        if self.sigmoid_both:
            p = logits.sigmoid() * valid.unsqueeze(1)  # B, 2, H, W
            t = torch.stack([target == 0, target == 1], dim=1).float()
        else:
            p = (logits.softmax(dim=1)[:, 1] * valid).unsqueeze(1)  # B, 1, H, W
            t = (target == 1).float().unsqueeze(1)
        inter = (p * t).flatten(2).sum(2)
        if self.squared:
            den = (p * p).flatten(2).sum(2) + (t * t).flatten(2).sum(2)
        else:
            den = p.flatten(2).sum(2) + t.flatten(2).sum(2)
        loss = 1 - (2 * inter + self.smooth) / (den + self.smooth).clamp(min=self.eps)  # B, channels
        return loss.mean() if self.channel_reduction == "mean" else loss.sum(dim=1).mean()


def safe_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean CE over non-255 pixels (logits upsampled to the target size); 0 when every pixel is 255
    (APANet's class-agnostic branch and CELP's contrast pass, whose targets may be all 255)."""
    logits = upsample_logits(logits, target.shape[-2:])
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum()
    return total / count.clamp(min=1).to(total.dtype)


class AuxLoss(nn.Module):
    """Base of training-only auxiliary losses; ``weight`` multiplies every returned term."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ConfigError(f"auxiliary loss weight must be >= 0; got {weight}")
        self.weight = float(weight)

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
        raise NotImplementedError


class DeepSupervision(AuxLoss):
    """PFENet's inner supervision: mean over FEM scales of the inner classifiers' loss (aux weight 1.0)."""

    def __init__(
        self, weight: float = 1.0, key: str = "inner_logits", loss: nn.Module | None = None, ignore_as_background: bool = False
    ) -> None:
        super().__init__(weight)
        self.key = key
        self.loss = loss if loss is not None else CrossEntropy(ignore_as_background)

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        target = batch[QUERY_MASK]
        terms = [self.loss(logits, target) for logits in outputs[self.key]]
        if not terms:  # a decoder without inner heads (I2R with one block): no term
            return {}
        return {"deep_supervision": torch.stack(terms).mean()}


class EnsembleNLL(nn.Module):
    """BAM's ensemble output read as what it is: non-negative scores from the probabilities of two learners.

    The reference feeds ``[merged background, meta foreground]`` (softmax probabilities passed through two 1x1
    convs) to CrossEntropy as if they were logits, which squashes them through a second softmax. This form
    normalises the clamped scores to a distribution and takes the negative log-likelihood; with the merge
    convs at their initial weights it equals CE on the meta learner's logits. Label 255 ignored.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = upsample_logits(scores, target.shape[-2:]).clamp(min=self.eps)
        return F.nll_loss((p / p.sum(dim=1, keepdim=True)).log(), target, ignore_index=IGNORE_INDEX)


class OutputCE(AuxLoss):
    """Cross-entropy of a named output against the query mask (BAM's CE on the meta learner, weight 1.0); ``loss``
    replaces the cross-entropy (SCCAN-Plus: the weighted Dice on the meta learner). ``optional``: no term when the
    model does not produce ``key`` (SSP's first-pass output exists only with its refinement pass)."""

    def __init__(
        self,
        weight: float = 1.0,
        key: str = "meta_logits",
        term: str = "meta",
        ignore_as_background: bool = False,
        loss: nn.Module | None = None,
        optional: bool = False,
    ) -> None:
        super().__init__(weight)
        self.key, self.term, self.optional = key, term, bool(optional)
        self.loss = loss if loss is not None else CrossEntropy(ignore_as_background)

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        if self.optional and self.key not in outputs:
            return {}
        return {self.term: self.loss(outputs[self.key], batch[QUERY_MASK])}


class SupportCE(AuxLoss):
    """Cross-entropy of support-branch predictions (B, K, C, h, w) against the support masks (I2R's support
    branch, Sec. 3.3): one output or a list of them (the inner heads), averaged over outputs and shots."""

    def __init__(
        self, weight: float = 0.5, key: str = "support_logits", term: str = "support", ignore_as_background: bool = False
    ) -> None:
        super().__init__(weight)
        self.key, self.term = key, term
        self.loss = CrossEntropy(ignore_as_background)

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        if self.key not in outputs:
            if getattr(model.decoder, "support_branch", True) is False:  # built without its support branch
                return {}
            raise ConfigError(f"aux loss {self.term!r} reads output {self.key!r}; the model gives {sorted(outputs)}")
        value = outputs[self.key]
        preds = value if isinstance(value, (list, tuple)) else [value]
        if not preds:  # a decoder without inner heads (I2R with one block): no term
            return {}
        target = batch[SUPPORT_MASKS].flatten(0, 1)
        return {self.term: torch.stack([self.loss(p.flatten(0, 1), target) for p in preds]).mean()}


class BaseLearnerCE(AuxLoss):
    """The reference's CE of the frozen base learner against the query's base-class label. It has no gradient
    (the base learner is frozen), so it is only logged: computed without autograd, returned detached."""

    def __init__(self, weight: float = 0.0, key: str = "base_logits") -> None:
        super().__init__(weight)
        self.key = key

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        from fsseg.data.batch import QUERY_BASE_LABEL
        from fsseg.models.bam import BaseLearner

        learner = next((m for m in model.modules() if isinstance(m, BaseLearner)), None)  # ensemble's or head's
        if learner is None:
            raise ConfigError("aux base_ce needs a base learner in the model (a BAM-based method)")
        with torch.no_grad():
            target = learner.base_index_label(batch[QUERY_BASE_LABEL])
            logits = upsample_logits(outputs[self.key], target.shape[-2:])
            return {"base": F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)}
