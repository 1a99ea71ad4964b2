"""HDMNet (Peng et al., CVPR 2023, "Hierarchical Dense Correlation Distillation for Few-Shot Segmentation") on BAM's
frozen base learner and ensemble.

Reference facts: shared/notes/affinity-and-pahnet.md and round2-references.md §1.4, §3.1 (Pbihao/HDMNet@39ec8b2
model/HDMNet.py, Transformer.py, MaskMultiheadAttention.py). Written from those facts, plain PyTorch (the
reference's mmcv/mmseg bricks are convolutions, LayerNorms and reshapes).

- `HDMNetHead`: reductions cat(layer3, layer2) -> 256 (ReLU, Dropout2d 0.5); per-shot support prototypes; the
  prior [feature 5, layer4]: max cosine of every query position to the support positions under the
  nearest-resized mask (``get_similarity``; NOT min-max normalised in the reference, ``prior_minmax`` offers
  PFENet's normalisation), shots averaged; the base learner's query logits; BAM's Gram scene difference. The
  support image is masked before the encoder by the segmenter (``model.support_masking: image``).
- `HDMNetDecoder`: query_merge [feature, prototype, 10 x prior] -> 64, supp_merge [feature, own prototype] -> 64
  (1x1 + ReLU); a SegFormer-style encoder shared by query and support (3 stages: patch embedding (k, s) = (1, 1),
  (3, 2), (3, 2) + LayerNorm, 2 layers each with spatial-reduction attention (heads 2/4/8, reduction 4/2/1) and a
  Mix-FFN (x4, depthwise 3x3), LayerNorm); coarse-to-fine matching (cross-attention with cosine / 0.1 scores, a
  softmax over the QUERY axis, support-background entries zeroed after it; the prior concatenated -> 3x3 conv +
  BN + ReLU; ``outs = up(outs) + parse(out + up(outs))``); classifier -> 2 channels at the finest stage.
  Returns ``distill_weights`` (coarse to fine): per query position the mean over support-foreground positions
  (and heads) of the matching scores.
- `HierarchicalDistillation` (aux loss): KL(teacher || student) with both softmaxed over positions; the coarsest
  stage is taught by the ground truth (foreground 1, elsewhere -1e9), each finer stage by the previous (coarser)
  one, detached and resized; mean over stages (the reference's sum / 3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.bam import BaseLearnerFeatures
from fsseg.models.losses import AuxLoss
from fsseg.models.ops import (
    cosine_similarity_map,
    full_precision,
    mask_to_feature,
    masked_average_pool,
    minmax_normalise,
    resize,
)
from fsseg.models.pahnet import build_per_block
from fsseg.models.pfenet import _reduction

__all__ = [
    "HDMNetDecoder",
    "HDMNetHead",
    "HierarchicalDistillation",
    "MatchingAttention",
    "distillation_kl",
    "hdmnet_prior",
]

LN_EPS = 1e-6  # the reference's norm_cfg LN eps


# ------------------------------------------------------------------------------------------------ head
def hdmnet_prior(query_feat: torch.Tensor, support_feat: torch.Tensor, support_mask: torch.Tensor, minmax: bool) -> torch.Tensor:
    """HDMNet's ``get_similarity`` per shot, averaged: for every query position the maximum cosine to the
    support positions of ``support_feat * mask`` (mask = label == 1, resized nearest); background support
    positions are zero vectors (cosine 0). query_feat (B, C, h, w); support_feat (B, K, C, h', w'); support_mask
    (B, K, H, W) binary -> (B, 1, h, w)."""
    b, k = support_feat.shape[:2]
    with full_precision(query_feat.device):
        m = F.interpolate(support_mask.flatten(0, 1)[:, None].float(), size=support_feat.shape[-2:], mode="nearest")
        s = support_feat.flatten(0, 1).float() * m
        q = query_feat.float().unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
        sim = cosine_similarity_map(q, s).max(dim=2).values  # B*K, h*w
        if minmax:
            sim = minmax_normalise(sim)
        return sim.view(b, k, 1, *query_feat.shape[-2:]).mean(dim=1).to(query_feat.dtype)


class HDMNetHead(nn.Module):
    """HDMNet's guidance (see the module docstring). Reads encoder taps ``mid``, ``high`` (layer4), the low tap
    of ``shot_weighting`` (layer2) and ``base_tap`` (the base learner's input).

    ``prior``: ``hdmnet`` (the reference) or ``aenet`` (PAHNet's HDMNetPlus: AENet's [FG, relu(FG - BG)] as
    SCCAN-Plus, on the reduced features' grid). ``prior_minmax``: false = the reference (raw max cosine, which HDMNet scales x10 in query_merge); true = PFENet's
    min-max normalisation. ``train_shot_weighting``: false = the reference (its ``kshot_rw`` is not in HDMNet's
    optimizer, so the 5-shot re-weighting stays at its initialisation); true = trained (PAHNet's HDMNetPlus).
    ``base_dropout``: the frozen base learner's Dropout2d active in training (the reference: ``model.train()``,
    then ``fix_bn`` freezes only BatchNorm); false: the learner wholly in eval.

    Output keys: query_feat (B, D, h, w), support_feat (B, K, D, h, w), support_prototypes (B, K, D), prototype
    (B, D, 1, 1), prior (B, 2, h, w) = [feature 5, layer4], support_mask (B, K, H, W), base_logits,
    scene_difference, shot_weights.
    """

    provides = (
        "query_feat", "support_feat", "support_prototypes", "prototype", "prior", "support_mask", "base_logits",
        "scene_difference", "shot_weights",
    )  # fmt: skip

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        base_learner: nn.Module,
        shot_weighting: nn.Module,
        base_tap: str = "base",
        reduce_dim: int = 256,
        dropout: float = 0.5,
        prior_minmax: bool = False,
        train_shot_weighting: bool = False,
        prior: str = "hdmnet",
        base_dropout: bool = False,
    ) -> None:
        super().__init__()
        if prior not in ("hdmnet", "aenet"):
            raise ConfigError(f"head.prior must be 'hdmnet' (max cosine [feature 5, layer4]) or 'aenet' ([FG, relu(FG - BG)]); got {prior!r}")
        self.prior_type = prior
        missing = sorted({"mid", "high", base_tap} - set(tap_channels))
        if missing:
            raise ConfigError(f"HDMNetHead needs encoder taps {missing} (head.base_tap={base_tap!r}); got {sorted(tap_channels)}")
        if reduce_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head.reduce_dim must be >= 1 and head.dropout in [0, 1); got {reduce_dim}, {dropout}")
        self.down_query = _reduction(tap_channels["mid"], reduce_dim, dropout)
        self.down_support = _reduction(tap_channels["mid"], reduce_dim, dropout)
        self.base = BaseLearnerFeatures(base_learner, base_tap, train_dropout=base_dropout)
        self.shot_weighting = shot_weighting
        if not train_shot_weighting:
            shot_weighting.requires_grad_(False)
        self.prior_minmax = bool(prior_minmax)

    def forward(self, query, support, support_mask) -> dict[str, torch.Tensor]:
        b, k = support["mid"].shape[:2]
        q = self.down_query(query["mid"])
        s = self.down_support(support["mid"].flatten(0, 1))
        m = mask_to_feature(support_mask, s.shape[-2:])  # bilinear, as the reference's prototype mask
        protos = masked_average_pool(s, m.flatten(0, 1)).view(b, k, -1)
        qf5, sf5, base_logits = self.base(query, support)
        if self.prior_type == "aenet":  # PAHNet's HDMNetPlus: AENet's prior on the reduced features' grid
            from fsseg.models.sccan import aenet_prior

            grid = tuple(q.shape[-2:])
            prior = aenet_prior(query["high"], support["high"], qf5, sf5, mask_to_feature(support_mask, grid), grid)
        else:
            prior = torch.cat(
                [hdmnet_prior(qf5, sf5, support_mask, self.prior_minmax),
                 hdmnet_prior(query["high"], support["high"], support_mask, self.prior_minmax)], dim=1
            )  # fmt: skip
        weights, est = self.shot_weighting(query, support)  # the weights only weigh the scene difference
        return {
            "query_feat": q, "support_feat": s.unflatten(0, (b, k)), "support_prototypes": protos,
            "prototype": protos.mean(dim=1)[:, :, None, None], "prior": resize(prior, q.shape[-2:]),
            "support_mask": support_mask, "base_logits": base_logits, "scene_difference": est, "shot_weights": weights,
        }  # fmt: skip


# ------------------------------------------------------------------------------------------------ transformer
def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _grid(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: 1x1 -> depthwise 3x3 -> GELU -> dropout -> 1x1 -> dropout (all convs with bias)."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GELU(),
            nn.Dropout(drop), nn.Conv2d(hidden, dim, 1), nn.Dropout(drop),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return _tokens(self.layers(_grid(x, size)))


class SelfAttention(nn.Module):
    """Spatial-reduction self-attention (SegFormer): keys/values from a k = s = ``sr`` conv + LayerNorm of the
    input when sr > 1; q/k/v/o without bias; scaled dot product."""

    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"decoder.num_heads ({heads}) must divide decoder.dim ({dim})")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.sr = nn.Sequential(nn.Conv2d(dim, dim, sr, stride=sr)) if sr > 1 else None
        self.sr_norm = nn.LayerNorm(dim, eps=LN_EPS) if sr > 1 else None

    def forward(self, x: torch.Tensor, size: Sequence[int], pair_bias: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``pair_bias`` with ``mask`` (N, 1, h, w) binary at the token grid (supports only; PAHNet's HDMNet):
        ``pair_bias`` (-100) added to the scores of FG-BG pairs, the keys' mask resized bilinearly (align_corners)
        to the reduced grid and binarised at 0.5; only where keys are spatially reduced (sr > 1), as the reference."""
        b, n, c = x.shape
        kv = x if self.sr is None else self.sr_norm(_tokens(self.sr(_grid(x, size))))
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (self.q(x), self.k(kv), self.v(kv)))
        bias = None
        if pair_bias is not None and mask is not None and self.sr is not None:
            mq = (mask.flatten(1) >= 0.5).to(q.dtype)  # N, n
            st = self.sr[0].stride
            side = (size[0] // st[0], size[1] // st[1])  # the reduction conv's output grid (k = s, no padding)
            mk = (F.interpolate(mask.to(q.dtype), size=side, mode="bilinear", align_corners=True).flatten(1) >= 0.5).to(q.dtype)
            bias = torch.where((mq[:, :, None] + mk[:, None, :]) == 1, float(pair_bias), 0.0).to(q.dtype)[:, None]
        return self.o(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, c))


class MatchingAttention(nn.Module):
    """HDMNet's matching (``MaskMultiHeadAttention.scaled_dotproduct`` with cross=True): scores S = cos(q, k) /
    ``temperature`` per head; A = softmax(S) over the QUERY axis; entries of support-background keys set to 0
    after the softmax (no renormalisation); out = o(A V). The distillation weight of a query position is the mean
    of S over support-foreground keys (0 without foreground), averaged over heads."""

    def __init__(self, dim: int, heads: int, temperature: float = 0.1, calibration: nn.Module | None = None) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"decoder.match_heads ({heads}) must divide decoder.dim ({dim})")
        if not temperature > 0:
            raise ConfigError(f"decoder.temperature must be > 0; got {temperature}")
        self.heads, self.temperature = heads, float(temperature)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.calibration = calibration  # PAHNet's ASC (fsseg.models.pahnet.QueryAxisScoreCalibration); None: HDMNet

    def attention(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor):
        """x (B, Nq, C), source (B, Ns, C), mask (B, Ns) in {0, 1} -> attention (B, h, Nq, Ns), values, scores."""
        b, c = x.shape[0], x.shape[2]
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (self.q(x), self.k(source), self.v(source)))
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / self.temperature
        keep = mask[:, None, None, :].to(scores.dtype)
        attn = scores.softmax(dim=-2) * keep  # softmax over the query axis, background keys zeroed
        return attn, v, scores

    def forward(
        self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, m_pro: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        if self.calibration is not None:  # PAHNet: ASC replaces the background-key zeroing and the FG-only weight
            if m_pro is None:
                raise ConfigError("decoder.score_calibration needs guidance 'm_pro' from a predictor (predictor=ssp | ...)")
            q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (self.q(x), self.k(source), self.v(source)))
            scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) / self.temperature
            attn, weight = self.calibration.attention(scores, m_pro, mask)
            return self.o((attn @ v).transpose(1, 2).reshape(b, n, c)), weight
        attn, v, scores = self.attention(x, source, mask)
        keep = mask[:, None, None, :].to(scores.dtype)
        weight = ((scores * keep).sum(-1) / (keep.sum(-1) + 1e-9)).mean(dim=1)  # B, Nq
        return self.o((attn @ v).transpose(1, 2).reshape(b, n, c)), weight


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer (SegFormer): x + drop(attn(LN1 x [, LN1 source])), then x + MixFFN(LN2 x).
    With ``match=True`` the attention is `MatchingAttention` over a source (one LN1 for both)."""

    def __init__(
        self, dim: int, heads: int, sr: int, mlp_ratio: int, drop: float, match: bool = False, temperature: float = 0.1,
        calibration: nn.Module | None = None,
    ):  # fmt: skip
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=LN_EPS), nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MatchingAttention(dim, heads, temperature, calibration) if match else SelfAttention(dim, heads, sr)
        self.drop = nn.Dropout(drop)
        self.ffn = MixFFN(dim, mlp_ratio * dim, drop)

    def forward(self, x, size, source=None, mask=None, m_pro=None, pair_bias=None):
        weight = None
        if source is None:
            x = x + self.drop(self.attn(self.norm1(x), size) if pair_bias is None else self.attn(self.norm1(x), size, pair_bias, mask))
        else:
            out, weight = self.attn(self.norm1(x), self.norm1(source), mask) if m_pro is None else self.attn(
                self.norm1(x), self.norm1(source), mask, m_pro
            )
            x = x + self.drop(out)
        return x + self.ffn(self.norm2(x), size), weight


class Stage(nn.Module):
    """Patch embedding (conv k, stride s, padding s // 2 + LN), two encoder layers, LN; NCHW in and out."""

    def __init__(self, dim: int, patch: int, stride: int, heads: int, sr: int, mlp_ratio: int, drop: float) -> None:
        super().__init__()
        self.embed = nn.Conv2d(dim, dim, patch, stride=stride, padding=stride // 2)
        self.embed_norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, sr, mlp_ratio, drop) for _ in range(2))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, pair_bias: float | None = None) -> torch.Tensor:
        """``mask`` (N, 1, H, W) and ``pair_bias``: the supports' FG-BG pair bias in the self-attention (PAHNet),
        the mask resized nearest to this stage's grid."""
        x = self.embed(x)
        size = x.shape[-2:]
        t = self.embed_norm(_tokens(x))
        if pair_bias is None or mask is None:
            for layer in self.layers:
                t = layer(t, size)[0]
        else:
            m = F.interpolate(mask.to(t.dtype), size=size, mode="nearest")
            for layer in self.layers:
                t = layer(t, size, mask=m, pair_bias=pair_bias)[0]
        return _grid(self.norm(t), size)


def _conv_bn(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout)]


class HierarchicalTransformer(nn.Module):
    """The stages, the matching layers (cross-attention + 3x3 conv/BN/ReLU over [out, prior]), parse and cls."""

    def __init__(
        self, dim: int, prior_channels: int, heads: Sequence[int], match_heads: int, patch_sizes: Sequence[int],
        strides: Sequence[int], sr_ratios: Sequence[int], mlp_ratio: int, drop: float, temperature: float,
        num_classes: int, block_enhancement: Any = None, score_calibration: Any = None,
        support_pair_bias: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        n = len(heads)
        if not n or not len(patch_sizes) == len(strides) == len(sr_ratios) == n:
            raise ConfigError(
                "decoder.num_heads, patch_sizes, strides and sr_ratios need one entry per stage; got "
                f"{list(heads)}, {list(patch_sizes)}, {list(strides)}, {list(sr_ratios)}"
            )
        enhancements = build_per_block(block_enhancement, n, "decoder.block_enhancement", dim=dim)
        calibrations = build_per_block(score_calibration, n, "decoder.score_calibration", dim=dim)
        self.stages = nn.ModuleList(
            Stage(dim, patch_sizes[i], strides[i], heads[i], sr_ratios[i], mlp_ratio, drop) for i in range(n)
        )
        self.match = nn.ModuleList(
            EncoderLayer(dim, match_heads, 1, mlp_ratio, drop, True, temperature, None if calibrations is None else calibrations[i])
            for i in range(n)
        )  # fmt: skip
        self.enhancements = None if enhancements is None else nn.ModuleList(enhancements)
        self.calibrated = calibrations is not None
        self.support_pair_bias = None if support_pair_bias is None else float(support_pair_bias)
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim + prior_channels, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True))
            for _ in range(n)
        )  # fmt: skip
        self.parse = nn.ModuleList(
            nn.Sequential(*_conv_bn(dim, 4 * dim, 1), *_conv_bn(4 * dim, 4 * dim, 3), *_conv_bn(4 * dim, dim, 1), nn.ReLU())
            for _ in range(n)
        )  # fmt: skip
        self.cls = nn.Sequential(*_conv_bn(dim, 4 * dim, 1), *_conv_bn(4 * dim, 4 * dim, 3), nn.Conv2d(4 * dim, num_classes, 1))

    def forward(
        self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, prior: torch.Tensor, m_pro: torch.Tensor | None = None
    ):
        """q (B, C, h, w); s (B*K, C, h, w) (shots folded, shot-major within an episode); mask (B, K, H, W);
        prior (B, P, h, w); m_pro (B, 1, h', w') (PAHNet's parts only) -> logits at the first stage's size, the
        distillation weights (coarse to fine) and the PFE's M_aff logits (coarse to fine; empty without PFE)."""
        b, k = mask.shape[:2]
        levels = []
        smask = mask.flatten(0, 1)[:, None].float() if self.support_pair_bias is not None else None
        for stage in self.stages:
            q, s = stage(q), stage(s) if smask is None else stage(s, smask, self.support_pair_bias)
            m = F.interpolate(mask.flatten(0, 1)[:, None].float(), size=s.shape[-2:], mode="nearest")
            tokens = _tokens(s).unflatten(0, (b, k)).flatten(1, 2)  # B, K*l, C (all shots)
            levels.append((q, tokens, m.view(b, -1)))
        outs, weights, affs = None, [], []
        for i in reversed(range(len(levels))):
            qi, tokens, m = levels[i]
            size = qi.shape[-2:]
            xq, p_asc = _tokens(qi), None
            if self.enhancements is not None:  # PFE on the stage's tokens; M_pro bilinear (align_corners) here
                p = resize(m_pro.to(xq.dtype), size).flatten(1)
                xq, tokens, aff = self.enhancements[i](xq, tokens, m, p)
                if aff is not None:
                    affs.append(aff.view(b, 2, *size))
            if self.calibrated:  # ASC reads M_pro resized nearest, as the reference
                p_asc = F.interpolate(m_pro.to(xq.dtype), size=size, mode="nearest").flatten(1)
            x, weight = self.match[i](xq, size, tokens, m, p_asc)
            weights.append(weight.view(b, *size))
            x = self.fuse[i](torch.cat([_grid(x, size), resize(prior, size)], dim=1))
            if outs is None:
                outs = self.parse[i](x)
            else:
                up = F.interpolate(outs, size=size, mode="bilinear", align_corners=False)
                outs = up + self.parse[i](x + up)
        return self.cls(outs), weights, affs


class HDMNetDecoder(nn.Module):
    """HDMNet's decoder on `HDMNetHead` guidance (see the module docstring).

    Args:
        in_dim: the head's reduced channels (256); dim: the transformer's (64).
        prior_channels, prior_scale: 2 and 10 (query_merge reads 10 x prior; the matching layers the raw prior).
        num_heads, match_heads, patch_sizes, strides, sr_ratios, mlp_ratio, dropout, temperature: the
            reference's [2, 4, 8], 2, [1, 3, 3], [1, 2, 2], [4, 2, 1], 4, 0.1, 0.1.
        bn_eval: true = the reference's ``fix_bn`` quirk (it matches every *BatchNorm class, so the transformer's
            BatchNorms stay in eval mode at their initial running statistics 0 / 1: a learnable affine only);
            false = what fix_bn intends (only the backbone's BatchNorm frozen; these ones train).

    Returns logits (B, 2, h, w) and distill_weights (coarse to fine, (B, h_i, w_i)).
    """

    requires = ("query_feat", "support_feat", "support_prototypes", "prototype", "prior", "support_mask")

    def __init__(
        self,
        in_dim: int = 256,
        dim: int = 64,
        prior_channels: int = 2,
        prior_scale: float = 10.0,
        num_heads: Sequence[int] = (2, 4, 8),
        match_heads: int = 2,
        patch_sizes: Sequence[int] = (1, 3, 3),
        strides: Sequence[int] = (1, 2, 2),
        sr_ratios: Sequence[int] = (4, 2, 1),
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        temperature: float = 0.1,
        num_classes: int = 2,
        bn_eval: bool = False,
        block_enhancement: Any = None,
        score_calibration: Any = None,
        support_pair_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.query_merge = nn.Sequential(nn.Conv2d(2 * in_dim + prior_channels, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.support_merge = nn.Sequential(nn.Conv2d(2 * in_dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.transformer = HierarchicalTransformer(
            dim, prior_channels, num_heads, match_heads, patch_sizes, strides, sr_ratios, mlp_ratio, dropout,
            temperature, num_classes, block_enhancement, score_calibration, support_pair_bias,
        )  # fmt: skip
        self.prior_scale, self.bn_eval = float(prior_scale), bool(bn_eval)
        if self.transformer.enhancements is not None or self.transformer.calibrated:
            self.requires = (*type(self).requires, "m_pro")

    def train(self, mode: bool = True) -> HDMNetDecoder:
        super().train(mode)
        if self.bn_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        q, s = guidance["query_feat"], guidance["support_feat"]
        size = q.shape[-2:]
        prior = resize(guidance["prior"], size)
        q = self.query_merge(torch.cat([q, guidance["prototype"].expand(-1, -1, *size), prior * self.prior_scale], dim=1))
        s_proto = guidance["support_prototypes"].flatten(0, 1)[:, :, None, None].expand(-1, -1, *s.shape[-2:])
        s = self.support_merge(torch.cat([s.flatten(0, 1), s_proto], dim=1))
        logits, weights, affs = self.transformer(q, s, guidance["support_mask"], prior, guidance.get("m_pro"))
        out = {"logits": logits, "distill_weights": weights}
        if affs:
            out["affinity_logits"] = affs
        return out


# ------------------------------------------------------------------------------------------------ distillation
def distillation_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """HDMNet's ``disstil_loss``: teacher (B, H, W) resized bilinearly (align_corners=False) to the student's
    (B, h, w), both softmaxed over positions, sum_i t_i (log(t_i + 1e-12) - log(s_i + 1e-12)), batch mean."""
    dtype = torch.promote_types(student.dtype, torch.float32)  # at least fp32 under bf16 autocast (-1e9, 1e-12)
    teacher, student = teacher.to(dtype), student.to(dtype)
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher[:, None], size=student.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    t, s = teacher.flatten(1).softmax(dim=1), student.flatten(1).softmax(dim=1)
    return (t * (torch.log(t + 1e-12) - torch.log(s + 1e-12))).sum(dim=1).mean()


class HierarchicalDistillation(AuxLoss):
    """HDMNet's correlation distillation (Sec. 3.4): term ``kl`` = mean over stages of `distillation_kl`, the
    coarsest stage taught by the ground truth (foreground 1, everything else -1e9: 255 counts as background),
    each finer one by the previous stage's weights, detached. Weight 1 gives the reference's KL / 3."""

    def __init__(self, weight: float = 1.0, key: str = "distill_weights") -> None:
        super().__init__(weight)
        self.key = key

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        stages = outputs[self.key]
        y = batch[QUERY_MASK]
        dtype = torch.promote_types(stages[0].dtype, torch.float32)
        teacher = torch.where(y == 1, 1.0, -1e9).to(dtype)
        total = stages[0].new_zeros((), dtype=dtype)
        for student in stages:
            total = total + distillation_kl(teacher, student)
            teacher = student.detach()
        return {"kl": total / len(stages)}
