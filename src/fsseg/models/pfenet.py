"""PFENet (Tian et al., TPAMI 2020): training-free prior mask, masked-average prototype, and the Feature
Enrichment Module (FEM) with inner deep supervision.  The baseline of APANet, SCNet and CELP.

Reference facts (shared/notes/baselines.md §1): reduction cat(layer3, layer2) -> 1x1 conv 256 + ReLU +
Dropout2d(0.5), separate for query and support; prototype = masked average (area + 5e-4); prior = max cosine
of query layer4 to masked support layer4, min-max per image; FEM scales [60, 30, 15, 8] at 473 input.
The reference recomputes support layer4 from mask-multiplied layer3; the paper masks the support's high-level
features. Both are options (``model.support_masking: none | deepest``, in the segmenter's ``encode``); this
head masks the support's ``high`` tap either way, as the reference masks its layer4 again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.layers import classifier, conv1x1_relu, conv3x3_relu
from fsseg.models.ops import (
    MAP_EPS,
    mask_to_feature,
    masked_average_pool,
    max_cosine_prior,
    resize,
    shot_priors,
)


def _reduction(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))


class PriorPrototypeHead(nn.Module):
    """Support/query guidance of PFENet: reduced mid-level features, the support prototype and the prior.

    Reads encoder taps ``mid`` (cat(layer3, layer2)) and ``high`` (layer4). K-shot: prototypes and priors are
    averaged over shots.  Output keys: query_feat (B, D, h, w), support_feat (B, K, D, h, w), prototype
    (B, D, 1, 1), prior (B, 1, h, w), support_mask_feat (B, K, 1, h, w), query_high (B, Ch, h', w').
    """

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        reduce_dim: int = 256,
        dropout: float = 0.5,
        shared_reduction: bool = False,
        use_prior: bool = True,
        shot_weighting: nn.Module | None = None,
        map_eps: float = MAP_EPS,
    ) -> None:
        super().__init__()
        if "mid" not in tap_channels or (use_prior and "high" not in tap_channels):
            raise ConfigError(f"PriorPrototypeHead needs encoder taps 'mid' and 'high'; got {sorted(tap_channels)}")
        if reduce_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head.reduce_dim must be >= 1 and head.dropout in [0, 1); got {reduce_dim}, {dropout}")
        mid = tap_channels["mid"]
        self.down_query = _reduction(mid, reduce_dim, dropout)
        # CELP shares one reduction for query and support (notes §6); PFENet keeps two.
        self.down_support = self.down_query if shared_reduction else _reduction(mid, reduce_dim, dropout)
        self.reduce_dim = reduce_dim
        self.use_prior = use_prior
        # K-shot fusion: None = average over shots (PFENet); a module giving per-shot weights (B, K) and the
        # scene difference (B,) from the taps = BAM's Gram re-weighting (fsseg.models.bam.GramShotWeighting)
        self.shot_weighting = shot_weighting
        if not 0.0 < map_eps < 1.0:
            raise ConfigError(f"head.map_eps (masked average pooling's area epsilon) must be in (0, 1); got {map_eps}")
        self.map_eps = float(map_eps)  # PFENet/BAM 5e-4; I2R's Weighted_GAP 1e-5

    def forward(
        self, query: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor], support_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        b, k = support["mid"].shape[:2]
        q = self.down_query(query["mid"])
        s = self.down_support(support["mid"].flatten(0, 1))
        size = q.shape[-2:]
        m = mask_to_feature(support_mask, size)  # B, K, 1, h, w
        protos = masked_average_pool(s, m.flatten(0, 1), self.map_eps).view(b, k, -1)
        out = {"query_feat": q, "support_feat": s.view(b, k, *s.shape[1:]), "support_mask_feat": m}
        if self.shot_weighting is None:
            proto = protos.mean(dim=1)  # K-shot average
        else:
            weights, out["scene_difference"] = self.shot_weighting(query, support)
            out["shot_weights"] = weights
            proto = (weights[:, :, None] * protos).sum(dim=1)
        out["prototype"] = proto[:, :, None, None]
        if self.use_prior:
            qh, sh = query["high"], support["high"]
            mh = mask_to_feature(support_mask, qh.shape[-2:])
            if self.shot_weighting is None:
                prior = max_cosine_prior(qh, sh, mh)
            else:
                prior = (out["shot_weights"][:, :, None, None, None] * shot_priors(qh, sh, mh)).sum(dim=1)
            out["prior"] = resize(prior, size)
            out["query_high"] = qh
        else:
            out["prior"] = q.new_zeros(b, 1, *size)
        return out

    def diagnostics(self, out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """I2R's Table 4 measure: binary cross entropy of the prior map (bilinear to the label size, clamped to
        [0, 1]) against the query's foreground (255 as background, as the reference), per episode (B,)."""
        if not self.use_prior:
            return {}
        target = (batch[QUERY_MASK] == 1).float()
        prior = resize(out["prior"].float(), target.shape[-2:])[:, 0].clamp(0, 1)
        return {"prior_ce": F.binary_cross_entropy(prior, target, reduction="none").flatten(1).mean(dim=1)}


class FeatureEnrichmentModule(nn.Module):
    """PFENet's FEM: multi-scale merging of [query feature, prototype, prior] with top-down information flow,
    inner classifiers per scale (deep supervision), then res1 / res2 / cls.

    ``bins``: per scale, an int > 1 is an absolute size (PASCAL 473: 60, 30, 15, 8), a float <= 1 a fraction
    of the feature size (COCO 641: 1.0, 0.5, 0.25, 0.125).  The prototype may be a vector (B, D, 1, 1), tiled,
    or a map (B, D, h, w), average-pooled to each scale (APANet's expanded region prototypes).
    Reads guidance keys query_feat, prototype, prior; returns logits (B, 2, h, w) and inner_logits (list).
    ``prior_scale`` multiplies the prior before merging (PFENet: 1; HDMNet scales its prior by 10 so that one
    channel among 2 * dim + 1 is not drowned at initialisation).
    """

    def __init__(
        self,
        dim: int = 256,
        bins: Sequence[float] = (60, 30, 15, 8),
        prior_channels: int = 1,
        num_classes: int = 2,
        dropout: float = 0.1,
        prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not bins or any(b <= 0 for b in bins):
            raise ConfigError(f"decoder.bins must be positive sizes or fractions; got {list(bins)}")
        if not prior_scale > 0:
            raise ConfigError(f"decoder.prior_scale must be > 0; got {prior_scale}")
        self.prior_scale = float(prior_scale)
        self.bins = [float(b) for b in bins]
        n = len(self.bins)
        self.init_merge = nn.ModuleList(conv1x1_relu(2 * dim + prior_channels, dim) for _ in range(n))
        self.alpha_conv = nn.ModuleList(conv1x1_relu(2 * dim, dim) for _ in range(n - 1))
        self.beta_conv = nn.ModuleList(nn.Sequential(conv3x3_relu(dim), conv3x3_relu(dim)) for _ in range(n))
        self.inner_cls = nn.ModuleList(classifier(dim, num_classes, dropout) for _ in range(n))
        self.res1 = conv1x1_relu(dim * n, dim)
        self.res2 = nn.Sequential(conv3x3_relu(dim), conv3x3_relu(dim))
        self.cls = classifier(dim, num_classes, dropout)

    def bin_sizes(self, h: int) -> list[int]:
        return [int(b) if b > 1 else max(1, int(h * b)) for b in self.bins]

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        query, proto, prior = guidance["query_feat"], guidance["prototype"], guidance["prior"] * self.prior_scale
        size = query.shape[-2:]
        merged, inner = [], []
        for i, bin_size in enumerate(self.bin_sizes(size[0])):
            q = F.adaptive_avg_pool2d(query, bin_size)
            if proto.shape[-1] == 1 and proto.shape[-2] == 1:
                p = proto.expand(-1, -1, bin_size, bin_size)
            else:
                p = F.adaptive_avg_pool2d(proto, bin_size)
            x = self.init_merge[i](torch.cat([q, p, resize(prior, (bin_size, bin_size))], dim=1))
            if merged:  # inter-scale path: the previous scale's enriched feature refines this one
                x = self.alpha_conv[i - 1](torch.cat([x, resize(merged[-1], (bin_size, bin_size))], dim=1)) + x
            x = self.beta_conv[i](x) + x
            inner.append(self.inner_cls[i](x))
            merged.append(resize(x, size))
        x = self.res1(torch.cat(merged, dim=1))
        x = self.res2(x) + x
        return {"logits": self.cls(x), "inner_logits": inner}
