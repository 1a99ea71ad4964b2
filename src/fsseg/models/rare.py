"""RARE (chunbolang/RARE, one model file ``RARE.py``; no config, no training script): PFENet-style features and
prior, a second "error-prone region" prototype from the support pixels that the feature-resolution mask loses,
unidirectional pooling attention that spreads each prototype over the query ("refine"), ASPP decoder. One of
PAHNet's prototype predictors (round2-references.md §1.6).

Reference facts (RARE.py):
- Reduced query/support features cat(layer3, layer2) -> 1x1 -> 256 (ReLU, Dropout2d 0.5; separate convs);
  PFENet's prior from layer4 (support ``layer4(layer3 x mask)``).
- Error-prone support region: mask_res = relu(mask - up_nearest(down_nearest(mask))) (foreground pixels lost
  at the feature resolution), bilinear to the feature size; prototypes P = WGAP(s, mask), P_res = WGAP(s,
  mask_res) (area + 5e-4); beta = mean(mask_res) / (mean(mask) + 1e-7).
- Activation maps cos(q, P) and cos(q, P_res) (2 channels).
- refine(s, q, P, m): a_h = softmax over all (hq, hs) pairs of pool_w(q)[hq] * pool_w(s m)[hs] per channel,
  a_w likewise over (ws, wq); each through 1x1 conv + ReLU and a residual 3x3 conv + ReLU (on the h x h / w x w
  maps, channels as channels); out = a_h' @ P (tiled h x w) @ a_w'. K shots: per pixel the shot whose refined
  map is most cosine-similar to the query; beta averaged over shots.
- Merge: init_merge(cat[q, refine(P), prior, act, act_res]) + beta * init_merge_1(cat[q, refine(P_res), prior,
  act, act_res]) -> ASPP (pool, 1x1, 3x3 d6/12/18) -> 1x1 (5 dim -> dim) -> two 3x3 (residual) -> cls.
- Losses: CE(out) + alpha * CE(out, the query's error-prone region: 1 where a foreground pixel is lost at the
  feature resolution, 0 where a background pixel is gained, 255 elsewhere; alpha = mean over the batch of its
  area ratio) + a prototype-distance term on the merged feature (one random FG and one random BG query pixel
  per image: 1 - cos(f_fg, P_q) + cos(f_fg, f_bg) + cos(P_q, f_bg), / (3 B)). Weights of the terms: not
  published (1.0 each here [x]).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.bam import ASPP
from fsseg.models.layers import classifier, conv3x3_relu
from fsseg.models.losses import AuxLoss
from fsseg.models.ops import MAP_EPS, mask_to_feature, masked_average_pool, max_cosine_prior, resize

COSINE_EPS = 1e-7


def error_prone_region(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """RARE's lost-foreground map at full resolution: mask (N, 1, H, W) in {0, 1} -> relu(mask - up(down(mask)))
    with nearest down-sampling to ``size`` and nearest up-sampling back (N, 1, H, W)."""
    down = F.interpolate(mask, size=size, mode="nearest")
    up = F.interpolate(down, size=mask.shape[-2:], mode="nearest")
    return (mask - up).clamp(min=0)


def _reduction(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))


class UnidirectionalRefine(nn.Module):
    """RARE's ``refine``: row and column affinities between the (masked) support and the query from average
    pooling along one axis, softmax over all position pairs per channel, each passed through 1x1 + ReLU and a
    residual 3x3 + ReLU, then out = A_h @ P_tiled @ A_w. support, query (N, C, h, w), prototype (N, C), mask
    (N, 1, h, w) -> (N, C, h, w)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.res_h = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res_h_1 = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True))
        self.res_w = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res_w_1 = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.ReLU(inplace=True))

    def forward(self, support: torch.Tensor, query: torch.Tensor, prototype: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, c, h, w = support.shape
        s = support * mask
        s_h, s_w = s.mean(dim=3), s.mean(dim=2)  # N, C, h (pooled over width) / N, C, w
        q_h, q_w = query.mean(dim=3), query.mean(dim=2)
        a_h = (q_h[..., :, None] * s_h[..., None, :]).flatten(2).softmax(dim=-1).view(n, c, h, h)  # [hq, hs]
        a_w = (s_w[..., :, None] * q_w[..., None, :]).flatten(2).softmax(dim=-1).view(n, c, w, w)  # [ws, wq]
        a_h = self.res_h(a_h)
        a_h = self.res_h_1(a_h) + a_h
        a_w = self.res_w(a_w)
        a_w = self.res_w_1(a_w) + a_w
        tiled = prototype[..., None, None].expand(-1, -1, h, w)
        return torch.matmul(torch.matmul(a_h, tiled), a_w)


class RAREHead(nn.Module):
    """RARE before its ASPP decoder: returns ``merged`` (B, D, h, w) = init_merge(...) + beta * init_merge_1(...)
    (the decoder's input and the prototype-distance term's feature), ``query_feat``, ``prototype``,
    ``res_prototype``, ``prior``, ``activation`` (B, 2, h, w) and ``beta`` (B, 1, 1, 1)."""

    provides = ("merged", "query_feat", "prototype", "res_prototype", "prior", "activation", "beta")

    def __init__(self, tap_channels: Mapping[str, int], reduce_dim: int = 256, dropout: float = 0.5) -> None:
        super().__init__()
        missing = sorted({"mid", "high"} - set(tap_channels))
        if missing:
            raise ConfigError(f"RAREHead needs encoder taps 'mid' and 'high'; missing {missing}")
        mid = tap_channels["mid"]
        self.down_query = _reduction(mid, reduce_dim, dropout)
        self.down_support = _reduction(mid, reduce_dim, dropout)
        self.refine = UnidirectionalRefine(reduce_dim)
        self.init_merge = nn.Sequential(nn.Conv2d(2 * reduce_dim + 3, reduce_dim, 1, bias=False), nn.ReLU(inplace=True))
        self.init_merge_1 = nn.Sequential(nn.Conv2d(2 * reduce_dim + 3, reduce_dim, 1, bias=False), nn.ReLU(inplace=True))

    def forward(self, query, support, support_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        b, k = support["mid"].shape[:2]
        q = self.down_query(query["mid"])
        s = self.down_support(support["mid"].flatten(0, 1))  # B*K, D, h, w
        size = q.shape[-2:]
        full = support_mask.flatten(0, 1)[:, None]  # B*K, 1, H, W
        m = resize(full, size)  # bilinear, align_corners
        m_res = resize(error_prone_region(full, size), size)
        protos = masked_average_pool(s, m, MAP_EPS)  # B*K, D
        res_protos = masked_average_pool(s, m_res, MAP_EPS)
        beta = m_res.mean(dim=(2, 3), keepdim=True) / (m.mean(dim=(2, 3), keepdim=True) + COSINE_EPS)  # B*K, 1, 1, 1
        proto, res_proto = protos.view(b, k, -1).mean(1), res_protos.view(b, k, -1).mean(1)
        mh = mask_to_feature(support_mask, query["high"].shape[-2:])
        prior = resize(max_cosine_prior(query["high"], support["high"], mh), size)
        act = torch.stack([F.cosine_similarity(q, proto[..., None, None], dim=1),
                           F.cosine_similarity(q, res_proto[..., None, None], dim=1)], dim=1)  # fmt: skip
        qk = q.repeat_interleave(k, dim=0)  # B*K, D, h, w
        fuse_h = self.refine(s, qk, protos, m).view(b, k, *q.shape[1:])
        fuse_res = self.refine(s, qk, res_protos, m_res).view(b, k, *q.shape[1:])
        if k > 1:  # per pixel, the shot whose refined map is closest (cosine) to the query
            fuse_h = _closest_shot(fuse_h, q)
            fuse_res = _closest_shot(fuse_res, q)
        else:
            fuse_h, fuse_res = fuse_h[:, 0], fuse_res[:, 0]
        beta = beta.view(b, k, 1, 1, 1).mean(1)
        merged = self.init_merge(torch.cat([q, fuse_h, prior, act], dim=1))
        merged = merged + beta * self.init_merge_1(torch.cat([q, fuse_res, prior, act], dim=1))
        return {"merged": merged, "query_feat": q, "prototype": proto[..., None, None],
                "res_prototype": res_proto[..., None, None], "prior": prior, "activation": act, "beta": beta}  # fmt: skip


def _closest_shot(maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """maps (B, K, C, h, w), query (B, C, h, w) -> (B, C, h, w): per pixel the shot with the highest cosine."""
    sim = F.cosine_similarity(maps, query[:, None], dim=2)  # B, K, h, w
    idx = sim.argmax(dim=1, keepdim=True)[:, :, None].expand(-1, -1, maps.shape[2], -1, -1)
    return torch.gather(maps, 1, idx)[:, 0]


class RAREDecoder(nn.Module):
    """RARE after the merge: ASPP -> 1x1 (5 dim -> dim) -> two 3x3 (residual) -> cls (3x3, Dropout2d 0.1, 1x1 -> 2)."""

    requires = ("merged",)

    def __init__(self, dim: int = 256, dilations: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.aspp = ASPP(dim, dilations)
        self.res1 = nn.Sequential(nn.Conv2d(dim * (2 + len(dilations)), dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res2 = nn.Sequential(*conv3x3_relu(dim), *conv3x3_relu(dim))
        self.cls = classifier(dim, 2, 0.1)

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = self.res1(self.aspp(guidance["merged"]))
        x = self.res2(x) + x
        return {"logits": self.cls(x)}


def query_error_region_target(target: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """RARE's query target for the error-prone CE: 1 where a foreground pixel is lost at ``size`` (nearest down
    and up), 0 where a background pixel is gained, 255 elsewhere; and alpha = the batch mean of (lost pixels) /
    (foreground pixels + 1e-7)."""
    fg = (target == 1).float()[:, None]
    up = F.interpolate(F.interpolate(fg, size=size, mode="nearest"), size=fg.shape[-2:], mode="nearest")
    diff = (fg - up)[:, 0]
    label = torch.full_like(target, IGNORE_INDEX)
    label[diff == 1] = 1
    label[diff == -1] = 0
    alpha = ((diff == 1).float().mean(dim=(1, 2)) / (fg.mean(dim=(1, 2, 3)) + COSINE_EPS)).mean()
    return label, alpha


class ErrorRegionCE(AuxLoss):
    """RARE's alpha * CE(logits, the query's error-prone region) (`query_error_region_target`, at the size of the
    ``size_key`` output, the feature resolution); logits upsampled to the label size; 0 when nothing is lost."""

    def __init__(self, weight: float = 1.0, size_key: str = "query_feat") -> None:
        super().__init__(weight)
        self.size_key = size_key

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        target = batch[QUERY_MASK]
        label, alpha = query_error_region_target(target, tuple(outputs[self.size_key].shape[-2:]))
        logits = F.interpolate(outputs["logits"], size=target.shape[-2:], mode="bilinear", align_corners=True)
        if not (label != IGNORE_INDEX).any():
            return {"error_region": logits.sum() * 0}
        return {"error_region": F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX) * alpha}


class PrototypeDistanceLoss(AuxLoss):
    """RARE's ``loss_add`` on the merged feature: per image, one random foreground pixel f+ and one random
    background pixel f- of the query (label bilinear to the feature size, > 0.5 = foreground), and the query's
    masked-average prototype P: 1 - cos(f+, P) + cos(f+, f-) + cos(P, f-); summed over images having both, / (3 B).
    The pixels are drawn from the global torch generator (seeded per run)."""

    def __init__(self, weight: float = 1.0, key: str = "merged") -> None:
        super().__init__(weight)
        self.key = key

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        feat = outputs[self.key]
        b = feat.shape[0]
        m = resize((batch[QUERY_MASK] == 1).float()[:, None], feat.shape[-2:])[:, 0]  # B, h, w
        proto = masked_average_pool(feat, m[:, None], MAP_EPS)  # B, C
        fg, bg = (m > 0.5).flatten(1), (m <= 0.5).flatten(1)
        ok = fg.any(1) & bg.any(1)
        # one uniform draw among each image's FG (BG) positions: argmax of random keys on those positions
        keys = torch.rand(2, *fg.shape, device=feat.device)
        i_fg = torch.where(fg, keys[0], -1.0).argmax(1)
        i_bg = torch.where(bg, keys[1], -1.0).argmax(1)
        flat = feat.flatten(2)
        f_fg, f_bg = flat[torch.arange(b), :, i_fg], flat[torch.arange(b), :, i_bg]
        term = (1 - F.cosine_similarity(f_fg, proto, dim=1) + F.cosine_similarity(f_fg, f_bg, dim=1)
                + F.cosine_similarity(proto, f_bg, dim=1))  # fmt: skip
        return {"prototype_distance": (term * ok).sum() / (3 * b)}


__all__ = [
    "ErrorRegionCE", "PrototypeDistanceLoss", "RAREDecoder", "RAREHead", "UnidirectionalRefine",
    "error_prone_region", "query_error_region_target",
]  # fmt: skip
