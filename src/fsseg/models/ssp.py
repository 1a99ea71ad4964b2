"""SSP (Fan et al., "Self-Support Few-Shot Semantic Segmentation", ECCV 2022) and "Pro" (SSP without its
self-support step, PAHNet's supplement §B): prototype matching by scaled cosine similarity.

Reference facts (shared/notes/baselines.md §5, round2-references.md §1.6; fanq15/SSP model/SSP_matching.py):
- FG / BG prototypes: masked averages of the support feature over mask == 1 / mask == 0 (255 in neither; mask
  bilinear to the feature size, align_corners; area + 1e-5), averaged over shots.
- out_0 = 10 * [cos(q, BP), cos(q, FP)] (channels [bg, fg]).
- Self-support (SSP Sec. 3.2-3.3): from softmax(out_0), the query features with p_fg > 0.7 (none: the 12 most
  confident) give SSFP (their mean); p_bg > 0.6 (none: top 12) give SSBP (their mean) and the adaptive
  per-pixel background prototype ASBP(x) = sum_j softmax_j(2 * cos(q_x, b_j)) b_j over those features.
  FP_1 = 0.5 FP + 0.5 SSFP, BP_1 = 0.3 SSBP + 0.7 ASBP; out_1 = 10 * [cos(q, BP_1), cos(q, FP_1)].
- Refinement (optional): the same step from out_1, FP_2 = 0.5 FP + 0.2 FP_1 + 0.3 (0.5 FP + 0.5 SSFP'),
  BP_2 = 0.5 BP + 0.2 BP_1 + 0.3 (0.3 SSBP' + 0.7 ASBP'); out_2 = 0.7 * sim(FP_2, BP_2) + 0.3 out_1.
- Training loss: CE(final) [+ CE(out_1) with refinement] + CE(query self-matching) + 0.2 CE(support
  self-matching): the query (support) feature matched against its own ground-truth prototypes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_MASK, SUPPORT_MASKS
from fsseg.errors import ConfigError
from fsseg.models.losses import AuxLoss, CrossEntropy
from fsseg.models.ops import mask_to_feature

SSP_EPS = 1e-5  # SSP's masked-average-pooling epsilon (area + 1e-5)


def label_prototypes(feat: torch.Tensor, labels: torch.Tensor, eps: float = SSP_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-average FG (label == 1) and BG (label == 0) prototypes; 255 counts as neither.
    feat (N, C, h, w), labels (N, H, W) -> FP, BP (N, C)."""
    size = feat.shape[-2:]
    fg = mask_to_feature((labels == 1).float(), size)  # N, 1, h, w (bilinear, align_corners=True)
    bg = mask_to_feature((labels == 0).float(), size)
    fp = (feat * fg).sum(dim=(2, 3)) / (fg.sum(dim=(2, 3)) + eps)
    bp = (feat * bg).sum(dim=(2, 3)) / (bg.sum(dim=(2, 3)) + eps)
    return fp, bp


def cosine_logits(feat: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """scale * [cos(f, bg), cos(f, fg)] per pixel (SSP's similarity_func). feat (B, C, h, w); fg / bg either
    (B, C) vectors or (B, C, h, w) per-pixel prototypes -> (B, 2, h, w)."""
    fg = fg[..., None, None] if fg.dim() == 2 else fg
    bg = bg[..., None, None] if bg.dim() == 2 else bg
    return torch.stack([F.cosine_similarity(feat, bg, dim=1), F.cosine_similarity(feat, fg, dim=1)], dim=1) * scale


def _selection(prob: torch.Tensor, threshold: float, fallback_k: int) -> torch.Tensor:
    """(B, N) float mask of the positions with prob > threshold; an episode with none takes its top-k."""
    above = prob > threshold
    k = min(int(fallback_k), prob.shape[1])
    top = torch.zeros_like(above).scatter_(1, prob.topk(k, dim=1).indices, True)
    return torch.where(above.any(dim=1, keepdim=True), above, top).to(prob.dtype)


class SelfSupportMatching(nn.Module):
    """SSP's matching decoder (Pro when ``self_support`` is off): reads ``query_feat`` (B, C, h, w),
    ``prototype`` (FP) and ``bg_prototype`` (BP), both (B, C, 1, 1); returns ``logits`` (B, 2, h, w) at the
    feature size (out_2 with ``refine``, else out_1; Pro: out_0) and ``ssp_out0`` (always), ``ssp_out1``
    (with ``refine``: the first self-support pass, for its CE term).

    Args:
        self_support: the self-support step (SSP) or plain prototype matching (Pro).
        refine: the second self-support pass (SSP's "SSP refinement"; PAHNet's predictor: off).
        fg_threshold, bg_threshold, fallback_k: confident query positions (0.7, 0.6, top 12 when none).
        fg_mix: weight of FP in FP_1 (0.5); bg_mix: weight of SSBP in BP_1 (0.3; ASBP gets 1 - bg_mix).
        local_temperature: the factor of the cosine inside the adaptive BG softmax (2.0).
        scale: cosine logit scale (10.0).
    """

    requires = ("query_feat", "prototype", "bg_prototype")

    def __init__(
        self,
        self_support: bool = True,
        refine: bool = False,
        fg_threshold: float = 0.7,
        bg_threshold: float = 0.6,
        fallback_k: int = 12,
        fg_mix: float = 0.5,
        bg_mix: float = 0.3,
        local_temperature: float = 2.0,
        scale: float = 10.0,
    ) -> None:
        super().__init__()
        if refine and not self_support:
            raise ConfigError("decoder.refine=true repeats the self-support step: it needs decoder.self_support=true")
        for name, v in (("fg_threshold", fg_threshold), ("bg_threshold", bg_threshold), ("fg_mix", fg_mix), ("bg_mix", bg_mix)):
            if not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"decoder.{name} must be in [0, 1]; got {v}")
        if int(fallback_k) < 1 or not scale > 0 or not local_temperature > 0:
            raise ConfigError(
                f"decoder.fallback_k must be >= 1, decoder.scale and decoder.local_temperature > 0; got "
                f"{fallback_k}, {scale}, {local_temperature}"
            )
        self.self_support, self.refine = bool(self_support), bool(refine)
        self.fg_threshold, self.bg_threshold, self.fallback_k = float(fg_threshold), float(bg_threshold), int(fallback_k)
        self.fg_mix, self.bg_mix = float(fg_mix), float(bg_mix)
        self.local_temperature, self.scale = float(local_temperature), float(scale)

    def self_support_prototypes(self, feat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SSP's self-support prototypes from the query's own confident features (SSP Eq. 2-4 and the adaptive
        BG prototype, Eq. 6): SSFP (B, C), SSBP (B, C), ASBP (B, C, h, w). Vectorised over the batch: the
        selections are masks, the adaptive softmax runs over the selected positions only."""
        b, c, h, w = feat.shape
        prob = logits.softmax(dim=1).flatten(2)  # B, 2, N
        flat = feat.flatten(2)  # B, C, N
        sel_fg = _selection(prob[:, 1], self.fg_threshold, self.fallback_k)  # B, N
        sel_bg = _selection(prob[:, 0], self.bg_threshold, self.fallback_k)
        ssfp = (flat * sel_fg[:, None]).sum(-1) / sel_fg.sum(-1, keepdim=True)
        ssbp = (flat * sel_bg[:, None]).sum(-1) / sel_bg.sum(-1, keepdim=True)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sim = torch.bmm(unit.transpose(1, 2), unit) * self.local_temperature  # B, N (pixel), N (bg feature)
        sim = sim.masked_fill(sel_bg[:, None, :] == 0, float("-inf")).softmax(dim=-1)
        asbp = torch.bmm(flat, sim.transpose(1, 2)).view(b, c, h, w)  # sum_j a_xj b_j
        return ssfp, ssbp, asbp

    def _step(self, feat: torch.Tensor, fp: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ssfp, ssbp, asbp = self.self_support_prototypes(feat, logits)
        fp_new = self.fg_mix * fp + (1.0 - self.fg_mix) * ssfp  # FP_1 = 0.5 FP + 0.5 SSFP
        bp_new = self.bg_mix * ssbp[..., None, None] + (1.0 - self.bg_mix) * asbp  # BP_1 = 0.3 SSBP + 0.7 ASBP
        return fp_new, bp_new

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feat = guidance["query_feat"]
        fp, bp = guidance["prototype"].flatten(1), guidance["bg_prototype"].flatten(1)
        out0 = cosine_logits(feat, fp, bp, self.scale)
        if not self.self_support:  # Pro
            return {"logits": out0, "ssp_out0": out0}
        fp1, bp1 = self._step(feat, fp, out0)
        out1 = cosine_logits(feat, fp1, bp1, self.scale)
        if not self.refine:
            return {"logits": out1, "ssp_out0": out0}
        fp2, bp2 = self._step(feat, fp, out1)
        fp2 = 0.5 * fp + 0.2 * fp1 + 0.3 * fp2  # SSP refinement's prototype mix
        bp2 = 0.5 * bp[..., None, None] + 0.2 * bp1 + 0.3 * bp2
        out2 = 0.7 * cosine_logits(feat, fp2, bp2, self.scale) + 0.3 * out1
        return {"logits": out2, "ssp_out0": out0, "ssp_out1": out1}


class SupportPrototypes(nn.Module):
    """SSP's guidance: the query feature of one encoder tap as is, the support's masked-average FG and BG
    prototypes per shot (``support_fg``, ``support_bg``: (B, K, C)) and their shot averages (``prototype``,
    ``bg_prototype``: (B, C, 1, 1)). BG = label 0 only (the support labels come through the episode context:
    255 is neither FG nor BG, as in SSP). Also ``support_feat`` (B, K, C, h, w) for the support self-matching."""

    provides = ("query_feat", "support_feat", "prototype", "bg_prototype", "support_fg", "support_bg")

    def __init__(self, tap_channels: Mapping[str, int], tap: str = "ssp", eps: float = SSP_EPS) -> None:
        super().__init__()
        if tap not in tap_channels:
            raise ConfigError(f"head.tap={tap!r} is not an encoder tap ({sorted(tap_channels)}): SSP matches on one tap")
        self.tap, self.eps = tap, float(eps)

    def forward(self, query, support, support_mask, context=None) -> dict[str, torch.Tensor]:
        q, s = query[self.tap], support[self.tap]
        b, k = s.shape[:2]
        labels = support_mask.long() if context is None or context.support_labels is None else context.support_labels
        fp, bp = label_prototypes(s.flatten(0, 1), labels.flatten(0, 1), self.eps)
        fp, bp = fp.view(b, k, -1), bp.view(b, k, -1)
        return {
            "query_feat": q, "support_feat": s, "support_fg": fp, "support_bg": bp,
            "prototype": fp.mean(dim=1)[..., None, None], "bg_prototype": bp.mean(dim=1)[..., None, None],
        }  # fmt: skip


class SelfMatchingLoss(AuxLoss):
    """SSP's self-matching terms (training only): the query (``side: query``) or every support shot
    (``side: support``) matched against the prototypes of its own ground truth, 10 * [cos(f, BP), cos(f, FP)],
    CE against that mask (255 ignored), logits upsampled bilinearly to the mask size. SSP weights: query 1.0,
    support 0.2."""

    def __init__(self, weight: float = 1.0, side: str = "query", scale: float = 10.0, eps: float = SSP_EPS) -> None:
        super().__init__(weight)
        if side not in ("query", "support"):
            raise ConfigError(f"aux self-matching side must be 'query' or 'support'; got {side!r}")
        self.side, self.scale, self.eps = side, float(scale), float(eps)
        self.ce = CrossEntropy()

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        if self.side == "query":
            feat, labels = outputs["query_feat"], batch[QUERY_MASK]
            fp, bp = label_prototypes(feat, labels, self.eps)
        else:
            feat, labels = outputs["support_feat"].flatten(0, 1), batch[SUPPORT_MASKS].flatten(0, 1)
            fp, bp = outputs["support_fg"].flatten(0, 1), outputs["support_bg"].flatten(0, 1)
        logits = cosine_logits(feat, fp, bp, self.scale)
        if (labels == IGNORE_INDEX).all():
            return {f"{self.side}_self": logits.sum() * 0}
        return {f"{self.side}_self": self.ce(logits, labels)}


__all__ = ["SelfMatchingLoss", "SelfSupportMatching", "SupportPrototypes", "cosine_logits", "label_prototypes"]
