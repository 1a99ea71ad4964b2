"""SCCAN (Xu et al., ICCV 2023, "Self-Calibrated Cross Attention Network for Few-Shot Segmentation"), its BAM-based
"Plus" variant (AENet's SCCANPlus, the host PAHNet modifies) and "Aff" (SCCAN without its specific designs).

Reference facts: shared/notes/affinity-and-pahnet.md and round2-references.md §1.3, §3.2 (Sam1224/SCCAN@c4e7b40
model/SCCAN.py, swin_sccan.py; Sam1224/AENet SCCAN_CyCTR/model/SCCANPlus.py). Written from those facts.

- `MaskAggregationHead` (SCCAN, Aff): reductions cat(layer3, layer2) -> 256 (ReLU, Dropout2d), resized to the
  token grid (64 x 64 at 473 px); support features masked and averaged over shots; the pseudo-mask-aggregation
  prior (``SCCAN.generate_prior``): softmax over support positions of the layer4 cosine, weighting the support
  mask, min-max per image.
- `SCCANPlusHead` (SCCAN-Plus): unmasked support features, AENet's 2-channel prior [FG-similarity,
  relu(FG - BG)] from layer4 or the base learner's feature 5 (per episode and shot, the layer whose maximum is
  larger), the base learner's query logits and BAM's Gram scene difference for the ensemble.
- `SCCANDecoder`: init_merge (query: [feature, prototype, prior]; support: [feature, prototype, mask]; 1x1, no
  bias, no ReLU), 8 SCCA blocks (``attention: scca``) or Aff's global cross-attention blocks
  (``attention: global``), LayerNorm -> ReLU -> BAM's ASPP -> res1 -> res2 (residual) -> cls.

SCCA block (swin_sccan.py SwinTransformerBlock): one LayerNorm shared by query and support; odd blocks shift by
zero-padding window/2 on top/left and window - window/2 on bottom/right (not a cyclic roll: no attention mask);
patch alignment picks for each query window the support window whose foreground prototype is most similar
((cos + 1) / 2, windows without foreground score 0; ``generate_indices``); query tokens attend to [own window ;
aligned support window] with ONE softmax over scaled dot products (self) and plain cosines (cross); support
tokens run plain window self-attention; separate attention and MLP (ratio 1, GELU) for query and support.
Everything is vectorised over the batch and the windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.bam import ASPP, BaseLearnerFeatures
from fsseg.models.layers import classifier, conv3x3_relu
from fsseg.models.ops import (
    MAP_EPS,
    cosine_similarity_map,
    full_precision,
    mask_to_feature,
    masked_average_pool,
    minmax_normalise,
    resize,
)
from fsseg.models.pahnet import build_per_block
from fsseg.models.pfenet import _reduction

COS_EPS = 1e-7  # the references' cosine epsilon (added to the product of the norms)

__all__ = [
    "GlobalCrossBlock",
    "MaskAggregationHead",
    "SCCABlock",
    "SCCANDecoder",
    "SCCANPlusHead",
    "SCCAttention",
    "align_windows",
    "check_window",
    "shift_pad",
    "window_merge",
    "window_partition",
]


# ------------------------------------------------------------------------------------------------ windows
def check_window(grid_size: int, window_size: int) -> None:
    """The token grid must split into whole windows, unshifted and padded by one window (shifted blocks)."""
    if window_size < 1 or grid_size < 1 or grid_size % window_size:
        raise ConfigError(
            f"decoder.window_size ({window_size}) must divide the token grid decoder.grid_size ({grid_size}; set by "
            f"head.grid_size) "
            f"(and so the grid zero-padded by one window in shifted blocks, {grid_size + window_size})"
        )


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nH * nW, window * window, C), windows in raster order, tokens raster within."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)  # reshape: the grids may be permuted views
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B, nH * nW, window * window, C) -> (B, H, W, C)."""
    b, c = windows.shape[0], windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shift_pad(x: torch.Tensor, window: int) -> torch.Tensor:
    """SCCAN's shift: zeros, window // 2 rows/columns before and window - window // 2 after: (B, H, W, C) ->
    (B, H + window, W + window, C)."""
    a = window // 2
    return F.pad(x, (0, 0, a, window - a, a, window - a))


def shift_crop(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    a = window // 2
    return x[:, a : a + h, a : a + w]


def align_windows(query: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """Patch alignment (SCCAN Sec. 3.3; ``generate_indices``): for every query window, the index of the support
    window with the highest (cos(query window mean, support window foreground mean) + 1) / 2, zero for support
    windows without foreground; ties (e.g. no foreground anywhere) go to the first window.

    query, support (B, H, W, C); mask (B, H, W, 1) soft -> (B, nWindows) long."""
    qp = window_partition(query, window).mean(dim=2)  # B, n, C
    sw, mw = window_partition(support, window), window_partition(mask, window)
    area = mw.sum(dim=2)  # B, n, 1
    sp = (sw * mw).sum(dim=2) / (area + MAP_EPS)  # masked window prototypes
    cos = torch.einsum("bqc,bsc->bqs", qp, sp)
    cos = cos / (qp.norm(dim=-1)[:, :, None] * sp.norm(dim=-1)[:, None, :] + COS_EPS)
    score = (cos + 1) / 2 * (area[..., 0] > 0).to(cos.dtype)[:, None, :]
    return score.argmax(dim=2)


# ------------------------------------------------------------------------------------------------ attention
class SCCAttention(nn.Module):
    """Window attention of SCCAN (``CrossWindowAttention``): without ``context``, scaled dot-product
    self-attention; with ``context`` (the aligned support window), keys and values of [own window ; context]
    from one projection, scaled dot products for the own part and plain cosines for the context part, ONE
    softmax over both (SCCAN Eq. 6-7)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"decoder.num_heads ({heads}) must divide decoder.dim ({dim})")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(attn_drop), nn.Dropout(proj_drop)

    def weights(
        self, x: torch.Tensor, context: torch.Tensor | None = None, cross_fn=None, self_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, n, C), context (N, m, C) or None -> attention (N, heads, n, n [+ m]) and values. ``cross_fn``
        maps the cross scores before the softmax and ``self_bias`` is added to the self scores (PAHNet's ASC,
        `fsseg.models.pahnet.WindowScoreCalibration`); None: SCCAN's attention."""
        nb, n = x.shape[:2]
        src = x if context is None else torch.cat([x, context], dim=1)
        q = self.q(x).view(nb, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(src).view(nb, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1)
        own = logits[..., :n] * self.scale
        if self_bias is not None:
            own = own + self_bias
        if context is not None:
            kc = k[:, :, n:]
            cross = logits[..., n:] / (q.norm(dim=-1, keepdim=True) @ kc.norm(dim=-1, keepdim=True).transpose(-2, -1) + COS_EPS)
            if cross_fn is not None:
                cross = cross_fn(cross)
            own = torch.cat([own, cross], dim=-1)
        return own.softmax(dim=-1), v

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, cross_fn=None, self_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn, v = self.weights(x, context, cross_fn, self_bias)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(x.shape)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))


def _drop_path(rate: float) -> nn.Module:
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


class SCCABlock(nn.Module):
    """One SCCA block (see the module docstring) on token grids (B, H, W, C); ``shifted`` for odd blocks."""

    def __init__(
        self, dim: int, heads: int, window: int, shifted: bool, mlp_ratio: float = 1.0,
        drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, calibration: nn.Module | None = None,
        support_branch: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.window, self.shifted = int(window), bool(shifted)
        self.calibration = calibration  # PAHNet's ASC (fsseg.models.pahnet.WindowScoreCalibration); None: SCCAN
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)  # shared by query and support
        self.attn_q = SCCAttention(dim, heads, attn_drop=attn_drop, proj_drop=drop)
        # support_branch=false (the last block's support output feeds nothing): no parameters without a gradient
        self.attn_s = SCCAttention(dim, heads, attn_drop=attn_drop, proj_drop=drop) if support_branch else None
        hidden = int(dim * mlp_ratio)
        self.mlp_q, self.mlp_s = Mlp(dim, hidden, drop), (Mlp(dim, hidden, drop) if support_branch else None)
        self.drop_path = _drop_path(drop_path)

    def attend(
        self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, m_pro: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised grids q, s (B, H, W, C), mask (B, H, W, 1) -> attention outputs of query and support
        (B, H, W, C) and the aligned support window of every query window (B, nWindows). ``m_pro`` (B, H, W, 1):
        the predictor's query probability, read by the calibration (PAHNet's ASC) when the block has one."""
        h, w = q.shape[1:3]
        win = self.window
        if h % win or w % win:
            raise ConfigError(f"decoder.window_size ({win}) must divide the token grid ({h} x {w})")
        if self.shifted:
            q, s, mask = shift_pad(q, win), shift_pad(s, win), shift_pad(mask, win)
            if m_pro is not None:
                m_pro = shift_pad(m_pro, win)  # zero padding = confident background, as the reference
        hp, wp = q.shape[1:3]
        idx = align_windows(q, s, mask, win)
        qw, sw = window_partition(q, win), window_partition(s, win)  # B, n, win*win, C
        aligned = torch.gather(sw, 1, idx[:, :, None, None].expand(-1, -1, *sw.shape[2:]))
        if self.calibration is None:
            out_q = self.attn_q(qw.flatten(0, 1), aligned.flatten(0, 1)).view_as(qw)
            out_s = None if self.attn_s is None else self.attn_s(sw.flatten(0, 1)).view_as(sw)
        else:
            if m_pro is None:
                raise ConfigError("decoder.score_calibration needs guidance 'm_pro' from a predictor (predictor=ssp | ...)")
            mw = window_partition(mask, win)[..., 0]  # B, n, win*win
            m_aligned = torch.gather(mw, 1, idx[:, :, None].expand(-1, -1, mw.shape[2])).flatten(0, 1)
            p = window_partition(m_pro, win)[..., 0].flatten(0, 1)
            cal = self.calibration
            out_q = self.attn_q(
                qw.flatten(0, 1), aligned.flatten(0, 1), cross_fn=lambda c: cal.calibrate(c, p, m_aligned)
            ).view_as(qw)
            out_s = None
            if self.attn_s is not None:
                out_s = self.attn_s(sw.flatten(0, 1), self_bias=cal.support_bias(mw.flatten(0, 1))).view_as(sw)
        if out_s is None:
            out_q = window_merge(out_q, win, hp, wp)
            return (shift_crop(out_q, win, h, w) if self.shifted else out_q), None, idx
        out_q, out_s = window_merge(out_q, win, hp, wp), window_merge(out_s, win, hp, wp)
        if self.shifted:
            out_q, out_s = shift_crop(out_q, win, h, w), shift_crop(out_s, win, h, w)
        return out_q, out_s, idx

    def forward(
        self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor, m_pro: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_q, out_s, _ = self.attend(self.norm1(q), self.norm1(s), mask, m_pro)
        q = q + self.drop_path(out_q)
        q = q + self.drop_path(self.mlp_q(self.norm2(q)))
        if out_s is None:  # no support branch: the support tokens pass unchanged (nothing reads them)
            return q, s
        s = s + self.drop_path(out_s)
        s = s + self.drop_path(self.mlp_s(self.norm2(s)))
        return q, s


class GlobalCrossBlock(nn.Module):
    """Aff's block: every query token attends to every support token (one scaled dot-product softmax over the
    whole support grid; no windows, no patch alignment, no self part, no cosine), then an MLP; pre-LayerNorm
    (one LayerNorm shared by query and support) and residuals as SCCA's query branch. Support tokens are not
    updated (SCCAN updates them only to feed later blocks' cross-attention)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 1.0, drop: float = 0.0, attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"decoder.num_heads ({heads}) must divide decoder.dim ({dim})")
        self.heads, self.attn_drop = heads, float(attn_drop)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = _drop_path(drop_path)

    def forward(self, q: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, w, c = q.shape
        x, src = self.norm1(q).view(b, h * w, c), self.norm1(s).view(b, -1, c)
        qh = self.q(x).view(b, h * w, self.heads, -1).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qh, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, h * w, c))).view(b, h, w, c)
        q = q + self.drop_path(out)
        return q + self.drop_path(self.mlp(self.norm2(q))), s


# ------------------------------------------------------------------------------------------------ heads
class MaskAggregationHead(nn.Module):
    """SCCAN's guidance on a token grid (see the module docstring). Reads encoder taps ``mid`` (cat(layer3,
    layer2)) and ``high`` (layer4). K shots: support features, masks and prototypes averaged over shots, the
    prior computed per shot and averaged (as the reference).

    Output keys: query_feat (B, D, g, g), support_fused (B, D, g, g) (masked features unless
    ``mask_support=false``), support_mask_fused (B, 1, g, g), prototype (B, D, 1, 1), prior (B, P, g, g).
    """

    provides = ("query_feat", "support_fused", "support_mask_fused", "prototype", "prior")

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        reduce_dim: int = 256,
        dropout: float = 0.5,
        grid_size: int = 64,
        mask_support: bool = True,
    ) -> None:
        super().__init__()
        if "mid" not in tap_channels or "high" not in tap_channels:
            raise ConfigError(f"{type(self).__name__} needs encoder taps 'mid' and 'high'; got {sorted(tap_channels)}")
        if reduce_dim < 1 or not 0.0 <= dropout < 1.0 or grid_size < 1:
            raise ConfigError(
                f"head.reduce_dim and head.grid_size must be >= 1 and head.dropout in [0, 1); got {reduce_dim}, "
                f"{grid_size}, {dropout}"
            )
        self.down_query = _reduction(tap_channels["mid"], reduce_dim, dropout)
        self.down_support = _reduction(tap_channels["mid"], reduce_dim, dropout)
        self.grid = (int(grid_size), int(grid_size))
        self.mask_support = bool(mask_support)

    def reduce(self, query, support, support_mask):
        """Reduced query (B, D, g, g) and support (B, K, D, g, g) features, grid masks (B, K, 1, g, g) and the
        per-shot prototypes (B, K, D)."""
        b, k = support["mid"].shape[:2]
        q = resize(self.down_query(query["mid"]), self.grid)
        s = resize(self.down_support(support["mid"].flatten(0, 1)), self.grid)
        m = mask_to_feature(support_mask, self.grid)  # (B, K, 1, g, g), bilinear as the reference
        protos = masked_average_pool(s, m.flatten(0, 1)).view(b, k, -1)
        return q, s.unflatten(0, (b, k)), m, protos

    def fuse(self, q, s, m, protos) -> dict[str, torch.Tensor]:
        """The shots fused as the reference: features (masked or not), masks and prototypes averaged."""
        return {
            "query_feat": q,
            "support_fused": (s * m if self.mask_support else s).mean(dim=1),
            "support_mask_fused": m.mean(dim=1),
            "prototype": protos.mean(dim=1)[:, :, None, None],
        }

    def forward(self, query, support, support_mask) -> dict[str, torch.Tensor]:
        q, s, m, protos = self.reduce(query, support, support_mask)
        out = self.fuse(q, s, m, protos)
        out["prior"] = self.prior(query, support, m)
        return out

    def prior(self, query, support, m: torch.Tensor) -> torch.Tensor:
        """Pseudo-mask aggregation (SCCAN Sec. 3.4, ``generate_prior``): per query position, the support mask
        averaged with softmax(cos(query layer4, support layer4)) weights over support positions; min-max per
        image; query layer4 at its own size, support layer4 on the grid; shots averaged -> (B, 1, g, g)."""
        qh, sh = query["high"], support["high"]
        b, k = sh.shape[:2]
        with full_precision(qh.device):
            s = resize(sh.flatten(0, 1).float(), self.grid)  # B*K, C, g, g
            q = qh.float().unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
            weights = cosine_similarity_map(q, s).softmax(dim=-1)  # B*K, Nq, Ns
            agg = torch.bmm(weights, m.flatten(0, 1).float().flatten(1)[:, :, None])[..., 0]  # B*K, Nq
            prior = minmax_normalise(agg).view(b * k, 1, *qh.shape[-2:])
        return resize(prior, self.grid).view(b, k, 1, *self.grid).mean(dim=1).to(qh.dtype)


def fg_bg_prior(query_feat: torch.Tensor, support_feat: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]):
    """AENet's prior from one layer (SCCANPlus ``generate_prior_proto``), per shot: FG = min-max cos(query,
    support FG prototype), BG likewise, both resized to the grid, corr = relu(FG - BG).

    query_feat (B, C, h, w); support_feat (B, K, C, g, g) and mask (B, K, 1, g, g) on the grid.
    Returns FG (B, K, g, g), corr (B, K, g, g), max raw FG cosine (B, K), max corr (B, K)."""
    b, k = support_feat.shape[:2]
    with full_precision(query_feat.device):
        s, m = support_feat.flatten(0, 1).float(), mask.flatten(0, 1).float()
        protos = torch.stack([masked_average_pool(s, m), masked_average_pool(s, 1 - m)], dim=1)  # B*K, 2, C
        q = query_feat.float().unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
        cos = cosine_similarity_map(protos.transpose(1, 2)[..., None], q)  # B*K, 2, h*w (eps as the reference)
        fg_max = cos[:, 0].max(dim=1).values
        sims = minmax_normalise(cos.reshape(b * k * 2, -1)).view(b * k, 2, *query_feat.shape[-2:])
        sims = resize(sims, grid)
        corr = (sims[:, 0] - sims[:, 1]).clamp(min=0)
        return sims[:, 0].view(b, k, *grid), corr.view(b, k, *grid), fg_max.view(b, k), corr.flatten(1).max(1).values.view(b, k)


class SCCANPlusHead(MaskAggregationHead):
    """SCCAN-Plus guidance (AENet's SCCANPlus; PAHNet's host): `MaskAggregationHead`'s reductions with unmasked
    support features (``mask_support=false``), the 2-channel prior [FG, relu(FG - BG)] where, per episode and
    shot and separately for each channel, layer4 (``high``) or the base learner's feature 5 is used, whichever
    has the larger maximum; BAM's Gram scene difference (``shot_weighting``: its weights only weigh the scene
    difference, prototypes and priors are averaged as the reference) and the base learner's query logits.
    ``base_logits_at``: ``feature`` = classified at feature 5's size (the ensemble resizes the logits) | ``grid``
    = feature 5 resized to the grid, then classified (AENet's and PAHNet's code; a ReLU apart, so not equal when
    the sizes differ). ``base_dropout``: the frozen learner's Dropout2d active in training (their ``fix_bn``).

    Extra output keys: base_logits, scene_difference, shot_weights.
    """

    provides = (*MaskAggregationHead.provides, "base_logits", "scene_difference", "shot_weights")

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        base_learner: nn.Module,
        shot_weighting: nn.Module,
        base_tap: str = "base",
        reduce_dim: int = 256,
        dropout: float = 0.5,
        grid_size: int = 64,
        mask_support: bool = False,
        base_dropout: bool = False,
        base_logits_at: str = "feature",
    ) -> None:
        super().__init__(tap_channels, reduce_dim, dropout, grid_size, mask_support)
        if base_tap not in tap_channels:
            raise ConfigError(f"head.base_tap {base_tap!r} is not an encoder tap; the encoder has {sorted(tap_channels)}")
        if base_logits_at not in ("feature", "grid"):
            raise ConfigError(f"head.base_logits_at must be 'feature' or 'grid'; got {base_logits_at!r}")
        self.base = BaseLearnerFeatures(base_learner, base_tap, train_dropout=base_dropout)
        self.base_logits_at = base_logits_at
        self.shot_weighting = shot_weighting

    def forward(self, query, support, support_mask) -> dict[str, torch.Tensor]:
        q, s, m, protos = self.reduce(query, support, support_mask)
        out = self.fuse(q, s, m, protos)
        qf5, sf5, out["base_logits"] = self.base(query, support, self.grid if self.base_logits_at == "grid" else None)
        out["prior"] = self.fg_bg_prior(query, support, qf5, sf5, m)
        out["shot_weights"], out["scene_difference"] = self.shot_weighting(query, support)
        return out

    def fg_bg_prior(self, query, support, qf5: torch.Tensor, sf5: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return aenet_prior(query["high"], support["high"], qf5, sf5, m, self.grid)


def aenet_prior(qh: torch.Tensor, sh: torch.Tensor, qf5: torch.Tensor, sf5: torch.Tensor, m: torch.Tensor, grid) -> torch.Tensor:
    """AENet's prior [FG, relu(FG - BG)] (B, 2, g, g), each channel from layer4 (qh, sh) or feature 5 per episode
    and shot (the layer with the larger maximum: raw FG cosine for FG, corr for corr), then averaged over shots.
    m (B, K, 1, g, g): support masks on the grid (SCCAN-Plus; PAHNet's HDMNet ``head.prior=aenet``)."""
    b, k = m.shape[:2]
    layers = [(qh, sh), (qf5, sf5)]
    fg, corr, fg_max, corr_max = zip(*(
        fg_bg_prior(q, resize(s.flatten(0, 1), grid).unflatten(0, (b, k)), m, grid) for q, s in layers
    ))  # fmt: skip
    use5_fg = (fg_max[0] < fg_max[1])[..., None, None]  # the reference's strict "<": ties keep layer4
    use5_corr = (corr_max[0] < corr_max[1])[..., None, None]
    fg_map = torch.where(use5_fg, fg[1], fg[0]).mean(dim=1, keepdim=True)
    corr_map = torch.where(use5_corr, corr[1], corr[0]).mean(dim=1, keepdim=True)
    return torch.cat([fg_map, corr_map], dim=1).to(qh.dtype)


# ------------------------------------------------------------------------------------------------ decoder
class SCCANDecoder(nn.Module):
    """SCCAN's decoder (see the module docstring) on `MaskAggregationHead` / `SCCANPlusHead` guidance.

    Args:
        dim: channels of the reduced features and the transformer (SCCAN: 256).
        grid_size: the head's token grid (SCCAN: 64 at 473 px); ``window_size`` must divide it.
        attention: ``scca`` (SCCAN) or ``global`` (Aff: plain global cross-attention blocks).
        num_blocks, num_heads, window_size, mlp_ratio: SCCAN's 8, 8, 8, 1.
        prior_channels: 1 (SCCAN, Aff) or 2 (SCCAN-Plus).
        dilations: ASPP's (6, 12, 18) at 64 x 64 tokens.
        block_enhancement: PAHNet's PFE before every block: a factory (``_partial_``, called with ``dim``) or a
            list of one per block (`fsseg.models.pahnet.PrototypeEnhancement`); None: SCCAN.
        score_calibration: PAHNet's ASC inside every SCCA block: a factory (called with ``dim``, ``heads``) or a
            list of one per block (`fsseg.models.pahnet.WindowScoreCalibration`); None: SCCAN.
        final_support_branch: true = the reference (the last SCCA block also updates the support tokens, which
            nothing reads: its attn_s / mlp_s never get a gradient, so DDP needs find_unused_parameters); false:
            the last block has no support branch (DDP-safe; PAHNet's configs).

    Returns logits (B, 2, g, g); with ``block_enhancement`` also affinity_logits (one (B, 2, g, g) per block).
    Either PAHNet part reads guidance ``m_pro`` (a predictor's query probability), resized bilinearly
    (align_corners) to the grid (the reference's SSP output is the 64 x 64 grid already).
    """

    requires = ("query_feat", "support_fused", "support_mask_fused", "prototype", "prior")

    def parameters_without_gradient(self) -> list[str]:
        """Names of parameters no loss reaches (the last SCCA block's support branch, as the reference builds it):
        the segmenter refuses DDP without find_unused_parameters for them, before training starts."""
        if not self._idle_support_branch:
            return []
        last = self.transformer["blocks"][-1]
        return [f"transformer.blocks.{len(self.transformer['blocks']) - 1}.{n}" for n, _ in last.named_parameters()
                if n.startswith(("attn_s.", "mlp_s."))]

    def __init__(
        self,
        dim: int = 256,
        grid_size: int = 64,
        attention: str = "scca",
        num_blocks: int = 8,
        num_heads: int = 8,
        window_size: int = 8,
        mlp_ratio: float = 1.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        prior_channels: int = 1,
        dilations: Sequence[int] = (6, 12, 18),
        num_classes: int = 2,
        dropout: float = 0.1,
        block_enhancement: Any = None,
        score_calibration: Any = None,
        final_support_branch: bool = True,
    ) -> None:
        super().__init__()
        if attention not in ("scca", "global"):
            raise ConfigError(f"decoder.attention must be 'scca' (SCCAN) or 'global' (Aff); got {attention!r}")
        if num_blocks < 1:
            raise ConfigError(f"decoder.num_blocks must be >= 1; got {num_blocks}")
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"decoder.num_heads ({num_heads}) must divide decoder.dim ({dim})")
        if attention == "scca":
            check_window(grid_size, window_size)
        self.init_merge_query = nn.Conv2d(2 * dim + prior_channels, dim, 1, bias=False)
        self.init_merge_support = nn.Conv2d(2 * dim + 1, dim, 1, bias=False)
        rates = torch.linspace(0, drop_path, num_blocks).tolist()  # stochastic depth rule (0 in SCCAN)
        enhancements = build_per_block(block_enhancement, num_blocks, "decoder.block_enhancement", dim=dim)
        calibrations = build_per_block(score_calibration, num_blocks, "decoder.score_calibration", dim=dim, heads=num_heads)
        if calibrations is not None and attention != "scca":
            raise ConfigError("decoder.score_calibration (PAHNet's ASC) needs decoder.attention=scca (window attention)")
        if enhancements is not None or calibrations is not None:
            self.requires = (*type(self).requires, "m_pro")
        if attention == "scca":
            blocks = [
                SCCABlock(
                    dim, num_heads, window_size, i % 2 == 1, mlp_ratio, drop, attn_drop, rates[i],
                    None if calibrations is None else calibrations[i], final_support_branch or i < num_blocks - 1,
                )
                for i in range(num_blocks)
            ]  # fmt: skip
        else:
            blocks = [GlobalCrossBlock(dim, num_heads, mlp_ratio, drop, attn_drop, rates[i]) for i in range(num_blocks)]
        # PAHNet's PFEs sit with the blocks (the reference builds one inside each block), so an optimizer group
        # matching the transformer (SCCAN's AdamW) trains them as the reference's does
        parts = {"blocks": nn.ModuleList(blocks), "norm": nn.LayerNorm(dim)}
        if enhancements is not None:
            parts["enhancements"] = nn.ModuleList(enhancements)
        self.transformer = nn.ModuleDict(parts)
        self._idle_support_branch = attention == "scca" and final_support_branch
        self.enhanced = enhancements is not None
        self.calibrated = calibrations is not None
        self.aspp = ASPP(dim, dilations)
        self.res1 = nn.Sequential(nn.Conv2d((2 + len(dilations)) * dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res2 = nn.Sequential(*conv3x3_relu(dim), *conv3x3_relu(dim))
        self.cls = classifier(dim, num_classes, dropout)

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        q, s, m = guidance["query_feat"], guidance["support_fused"], guidance["support_mask_fused"]
        size = q.shape[-2:]
        proto = guidance["prototype"].expand(-1, -1, *size)
        q = self.init_merge_query(torch.cat([q, proto, resize(guidance["prior"], size)], dim=1))
        s = self.init_merge_support(torch.cat([s, proto, m], dim=1))
        q, s, mt = q.permute(0, 2, 3, 1), s.permute(0, 2, 3, 1), m.permute(0, 2, 3, 1)  # token grids (B, H, W, C)
        out: dict[str, Any] = {}
        if not self.enhanced and not self.calibrated:
            for block in self.transformer["blocks"]:
                q, s = block(q, s, mt)
        else:
            q, s, out["affinity_logits"] = self.pahnet_blocks(q, s, mt, guidance["m_pro"])
        x = F.relu(self.transformer["norm"](q).permute(0, 3, 1, 2))
        x = self.res1(self.aspp(x))
        x = self.res2(x) + x
        out["logits"] = self.cls(x)
        if not out.get("affinity_logits"):
            out.pop("affinity_logits", None)
        return out

    def pahnet_blocks(self, q, s, mt, m_pro: torch.Tensor):
        """The blocks with PAHNet's parts: PFE before each block (on the flattened grids), ASC inside it."""
        b, h, w, c = q.shape
        pt = resize(m_pro.to(q.dtype), (h, w)).permute(0, 2, 3, 1)  # B, H, W, 1 (bilinear, align_corners)
        affs = []
        for i, block in enumerate(self.transformer["blocks"]):
            if self.enhanced:
                xq, xs, aff = self.transformer["enhancements"][i](q.reshape(b, h * w, c), s.reshape(b, h * w, c), mt.reshape(b, -1), pt.reshape(b, -1))
                q, s = xq.view(b, h, w, c), xs.view(b, h, w, c)
                if aff is not None:
                    affs.append(aff.view(b, 2, h, w))
            q, s = block(q, s, mt, pt) if self.calibrated else block(q, s, mt)
        return q, s, affs
