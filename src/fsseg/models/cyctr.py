"""CyCTR (Zhang et al., NeurIPS 2021, "Few-Shot Segmentation via Cycle-Consistent Transformer") as an affinity
decoder on PFENet's guidance (PriorPrototypeHead: the reference's reduction, masked-average prototype and
max-cosine prior are PFENet's; shared/notes/baselines.md §4, YanFangCS/CyCTR-Pytorch@1a06183).

Decoder (model/CyCTR.py, model/cyc_transformer.py):
  query  = ReLU(conv1x1(cat(query_feat, prototype, prior)))              (qry_merge_feat)
  support = ReLU(conv1x1(cat(support_feat, per-shot prototype)))          (supp_merge_feat), tokens of all shots
  2 blocks of: self-alignment  = deformable self-attention on the query tokens (9 points, 1 level) + FFN
               cross-alignment = attention query -> sampled support tokens, cycle-consistency mask (Sec. 3.3) + FFN
             post-LayerNorm, FFN 3 x dim, dropout 0.1, heads 12 if dim % 12 == 0 else 8
  fused = conv1x1 + ReLU, then two conv3x3 + ReLU with a residual; logits = PFENet-style classifier.
Training adds the auxiliary support-mask prediction (``SupportMaskPrediction``, weight 1) with the same
weighted Dice loss (losses.DiceLoss, ``sigmoid_both``).

Deviations, all documented in docs/notes.md:
- The deformable attention is the reference's CUDA op (Deformable DETR's MSDeformAttn). Here its single-level
  case is plain PyTorch (``deformable_attention``: F.grid_sample, bilinear, zero padding, align_corners=False,
  exactly the reference's own ``ms_deform_attn_core_pytorch`` check path), so it runs on CPU and GPU.
- No padding masks: the guidance has no record of padded (255) pixels, so padded query positions are ordinary
  tokens (the reference masks them out of the deformable values and of the positional cumsum) and support 255
  pixels are background tokens (the reference samples them but gives them the -10000 key bias). A guidance may
  carry ``support_ignore_feat`` (CELP's contrast pass with ``token_mask: pseudo_mask``): those tokens then get
  that bias, as the reference's 255 pixels.
- Token labels are the soft support mask at feature size >= 0.5 (the reference: nearest-resized label == 1). A
  mask with no foreground (or no background) token is used as is: the additive -10000 bias never produces NaN,
  so the reference's fake 2 x 2 centre foreground / 4 corner background pixels are not needed.
- Sampled tokens carry their own labels (gathered with the sampling indices). The reference's
  ``CyCTransformer.sparse_sampling`` draws indices into the foreground (background) subset but reads the labels
  and valid flags of the FULL support mask at those indices (``supp_mask_b[fg_select_idx]``), i.e. of the first
  raster positions: its cycle rule compares wrong token labels (docs/notes.md).
- Token sampling (``sample_support_tokens``) is vectorised and drawn from the decoder's own generator (seeded
  by config, checkpointed). Evaluation is deterministic: the same count as the reference's test (300 K FG +
  300 K BG), drawn from a generator re-seeded with ``seed`` at every forward, with one score per token position
  shared by the whole batch, so an episode's tokens do not depend on the batch it is in. The reference draws
  test tokens from the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import QUERY_MASK, SUPPORT_MASKS
from fsseg.errors import ConfigError
from fsseg.models.layers import classifier, conv1x1_relu, conv3x3_relu
from fsseg.models.losses import AuxLoss, DiceLoss
from fsseg.models.ops import SeededModule, mask_to_feature, masked_average_pool, resize

BIAS_INCONSISTENT = -10000.0  # additive key-padding bias of cycle-inconsistent support tokens (reference)


def default_heads(dim: int) -> int:
    """The reference's rule: 12 heads if dim % 12 == 0, else 8."""
    return 12 if dim % 12 == 0 else 8


# ------------------------------------------------------------------------------------------------ positions
def sine_positional_encoding(h: int, w: int, dim: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine encoding (the reference's SinePositionalEncoding(dim // 2, normalize=True), no
    padding): (h * w, dim), channels [y: sin, cos, sin, ..., x: sin, cos, ...]."""
    feats = dim // 2
    scale, eps = 2 * math.pi, 1e-6
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(feats, dtype=torch.float32, device=device) // 2) / feats)

    def enc(v: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, feats), sin on even, cos on odd channels
        p = v[:, None] / dim_t
        return torch.stack([p[:, 0::2].sin(), p[:, 1::2].cos()], dim=2).flatten(1)

    py, px = enc(y), enc(x)
    return torch.cat([py[:, None, :].expand(h, w, -1), px[None, :, :].expand(h, w, -1)], dim=2).reshape(h * w, -1)


# ------------------------------------------------------------------------------------------------ self-alignment
def deformable_attention(value: torch.Tensor, locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Single-level multi-scale deformable attention (Deformable DETR Eq. 2; the CUDA op's equivalent).

    value (B, M, Dh, h, w) per head; locations (B, N, M, P, 2) as (x, y) in [0, 1] over the map (pixel centres
    at (i + 0.5) / size); weights (B, N, M, P). Bilinear sampling with zeros outside the map. Returns
    (B, N, M * Dh): for each query and head, sum_p weights * value(location_p)."""
    b, m, dh, h, w = value.shape
    n, p = locations.shape[1], locations.shape[3]
    grid = (2 * locations - 1).permute(0, 2, 1, 3, 4).reshape(b * m, n, p, 2)
    sampled = F.grid_sample(
        value.reshape(b * m, dh, h, w), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # B*M, Dh, N, P
    out = (sampled * weights.permute(0, 2, 1, 3).reshape(b * m, 1, n, p)).sum(-1)  # B*M, Dh, N
    return out.view(b, m * dh, n).transpose(1, 2)


class DeformableSelfAttention(nn.Module):
    """MSDeformAttn with one level (CyCTR's self-alignment, Sec. 3.4): per head, ``points`` sampling offsets and
    softmax weights from linear layers on the query (+ position), bilinear samples of the projected values around
    each token's own position. Reference extras kept: 10% value-token dropout and dropout 0.1 on the weights."""

    def __init__(self, dim: int, heads: int, points: int = 9, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"decoder.dim ({dim}) must be divisible by decoder.num_heads ({heads})")
        self.dim, self.heads, self.points, self.dropout = dim, heads, points, dropout
        self.sampling_offsets = nn.Linear(dim, heads * points * 2)
        self.attention_weights = nn.Linear(dim, heads * points)
        self.value_proj = nn.Linear(dim, dim, bias=False)
        self.output_proj = nn.Linear(dim, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: zero offset weights, bias = one ring direction per head, point i at i + 1 px."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, :] * torch.arange(1, self.points + 1, dtype=torch.float32)[None, :, None]  # M, P, 2
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.xavier_uniform_(self.output_proj.weight)

    def forward(self, query: torch.Tensor, value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """query (B, N, C) (with positions added), value (B, N, C) with N = h * w in raster order -> (B, N, C)."""
        b, n, c = value.shape
        h, w = size
        v = self.value_proj(value)
        if self.training and self.dropout > 0:  # reference: drop whole value tokens
            v = v * (F.dropout(v.new_ones(b, n, 1), self.dropout) != 0)
        v = v.view(b, h, w, self.heads, c // self.heads).permute(0, 3, 4, 1, 2)  # B, M, Dh, h, w
        offsets = self.sampling_offsets(query).view(b, n, self.heads, self.points, 2)
        weights = self.attention_weights(query).view(b, n, self.heads, self.points).softmax(-1)
        weights = F.dropout(weights, self.dropout, self.training)
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=query.device, dtype=query.dtype) + 0.5) / h,
            (torch.arange(w, device=query.device, dtype=query.dtype) + 0.5) / w,
            indexing="ij",
        )
        ref = torch.stack([xs, ys], -1).view(1, n, 1, 1, 2)
        norm = torch.tensor([w, h], device=query.device, dtype=query.dtype)
        return self.output_proj(deformable_attention(v, ref + offsets / norm, weights))


# ------------------------------------------------------------------------------------------------ cross-alignment
def cycle_consistency_mask(attn: torch.Tensor, support_labels: torch.Tensor) -> torch.Tensor:
    """CyCTR Sec. 3.3: for each support token j, i* = argmax_i attn[i, j] (its best query token), j* =
    argmax_j' attn[i*, j'] (that query token's best support token); j is consistent iff label[j] == label[j*].

    attn (..., Nq, Ns); support_labels broadcastable to (..., Ns). Returns bool (..., Ns), True = consistent."""
    i_star = attn.argmax(dim=-2)  # ..., Ns
    j_of_i = attn.argmax(dim=-1)  # ..., Nq
    j_star = torch.gather(j_of_i, -1, i_star)
    labels = support_labels.expand_as(i_star)
    return labels == torch.gather(labels, -1, j_star)


class CycleCrossAttention(nn.Module):
    """Multi-head attention from query tokens to support tokens (Eq. 5) with the cycle-consistency bias: every
    inconsistent support token gets -10000 on its key, per head, after Dropout(0.1) on the inconsistency map
    (during training a tenth of them stay visible). Projections without bias, attention and output dropout."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.1, mask_dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q_fc, self.k_fc, self.v_fc = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_drop, self.proj_drop = nn.Dropout(dropout), nn.Dropout(dropout)
        self.mask_drop = nn.Dropout(mask_dropout)

    def forward(
        self, q: torch.Tensor, s: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, Nq, C), s (B, Ns, C) support tokens (keys = values), labels (B, Ns) bool foreground, ignore
        (B, Ns) bool or None: tokens that get the -10000 key bias whatever their consistency (the reference's
        ``supp_valid_mask``, its 255 support pixels). Returns (B, Nq, C) and the consistency map (B, heads, Ns)."""
        b, nq, c = q.shape
        ns = s.shape[1]
        q = self.q_fc(q).view(b, nq, self.heads, -1).transpose(1, 2)
        k = self.k_fc(s).view(b, ns, self.heads, -1).transpose(1, 2)
        v = self.v_fc(s).view(b, ns, self.heads, -1).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale  # B, M, Nq, Ns
        consistent = cycle_consistency_mask(attn.detach(), labels[:, None, :])
        inconsistent = self.mask_drop((~consistent).to(attn.dtype)) > 0
        if ignore is not None:  # the reference: valid_mask[inconsistent] = 1, then -10000 * valid_mask
            inconsistent = inconsistent | ignore[:, None, :]
        attn = attn + inconsistent[:, :, None, :].to(attn.dtype) * BIAS_INCONSISTENT
        x = self.attn_drop(attn.softmax(-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, nq, c))), consistent


class FFN(nn.Module):
    """Two linear layers (no bias), ReLU, dropout; residual added inside (the reference's FFN)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim, bias=False),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.layers(x))


# ------------------------------------------------------------------------------------------------ support tokens
def sample_support_tokens(labels: torch.Tensor, num_fg: int, num_bg: int, scores: torch.Tensor) -> torch.Tensor:
    """Indices (B, T) of T = min(num_fg + num_bg, N) support tokens: num_fg foreground and num_bg background
    ones, chosen by the smallest ``scores`` (uniform randoms, (B, N) or (1, N)) within each class, vectorised.

    Short masks, as the reference: with fewer foreground tokens than num_fg, all of them are taken and the rest
    is background (and vice versa); with T = N every token is taken. Foreground indices come first."""
    b, n = labels.shape
    t = min(num_fg + num_bg, n)
    order = torch.argsort(scores.expand(b, n) + 2.0 * (~labels).to(scores.dtype), dim=1)  # fg (random), then bg
    n_fg = labels.sum(dim=1, keepdim=True)  # B, 1
    take_fg = torch.minimum(n_fg, torch.clamp(t - (n - n_fg), min=num_fg))
    pos = torch.arange(t, device=labels.device)[None, :]
    return torch.gather(order, 1, torch.where(pos < take_fg, pos, n_fg + pos - take_fg))


class CyCTRBlock(nn.Module):
    """One CyCTR block: self-alignment + FFN, then cross-alignment + FFN, post-LayerNorm after each (Fig. 2)."""

    def __init__(self, dim: int, heads: int, points: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = DeformableSelfAttention(dim, heads, points, dropout)
        self.cross_attn = CycleCrossAttention(dim, heads, dropout)
        self.ffn_self, self.ffn_cross = FFN(dim, ffn_dim, dropout), FFN(dim, ffn_dim, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))
        self.drop = nn.Dropout(dropout)

    def forward(self, q, pos, size, tokens, labels, ignore=None) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norms[0](q + self.drop(self.self_attn(q + pos, q, size)))
        q = self.norms[1](self.ffn_self(q))
        out, consistent = self.cross_attn(q, tokens, labels, ignore)
        q = self.norms[2](q + out)
        return self.norms[3](self.ffn_cross(q)), consistent


class CycleTransformer(SeededModule):
    """The blocks, the query positional encoding (sine + a learnt level embedding) and support-token sampling.

    Training: a fresh sample for every block, with counts 300 K x U(token_scale) (K = shots). Evaluation:
    300 K + 300 K tokens sampled once (with ``seed``, identically at every call) and shared by the blocks."""

    def __init__(
        self,
        dim: int,
        num_blocks: int = 2,
        num_heads: int | None = None,
        num_points: int = 9,
        ffn_ratio: int = 3,
        dropout: float = 0.1,
        fg_tokens: int = 300,
        bg_tokens: int = 300,
        token_scale_1shot: Sequence[float] = (0.6, 4.0),
        token_scale_kshot: Sequence[float] = (0.6, 1.4),
        seed: int = 0,
    ) -> None:
        super().__init__()
        heads = default_heads(dim) if num_heads is None else int(num_heads)
        self.blocks = nn.ModuleList(
            CyCTRBlock(dim, heads, num_points, ffn_ratio * dim, dropout) for _ in range(num_blocks)
        )
        self.level_embed = nn.Parameter(torch.empty(1, dim))
        self.fg_tokens, self.bg_tokens = int(fg_tokens), int(bg_tokens)
        self.token_scale = {1: tuple(map(float, token_scale_1shot)), 2: tuple(map(float, token_scale_kshot))}
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed % 2**64)
        for m in self.modules():  # the reference's init: xavier on every Linear, zero bias, then MSDeformAttn's
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, DeformableSelfAttention):
                m.reset_parameters()
        nn.init.xavier_uniform_(self.level_embed)

    def _sample(self, labels: torch.Tensor, shots: int, generator: torch.Generator | None) -> torch.Tensor:
        b, n = labels.shape
        num_fg, num_bg = self.fg_tokens * shots, self.bg_tokens * shots
        if self.training:
            lo, hi = self.token_scale[min(shots, 2)]
            scale = lo + (hi - lo) * torch.rand((), generator=self.generator, dtype=torch.float64).item()
            num_fg, num_bg = int(num_fg * scale), int(num_bg * scale)
            scores = torch.rand(b, n, generator=self.generator)
        else:  # one score per token position for the whole batch: batch-independent, deterministic
            scores = torch.rand(1, n, generator=generator)
        return sample_support_tokens(labels, num_fg, num_bg, scores.to(labels.device))

    def forward(
        self,
        query: torch.Tensor,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        shots: int,
        ignore: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """query (B, C, h, w), tokens (B, Ns, C), labels (B, Ns) bool, ignore (B, Ns) bool or None (ignored tokens
        stay in the background pool of the sampler and get the -10000 key bias once sampled) -> (B, C, h, w),
        per-block consistency."""
        b, c, h, w = query.shape
        q = query.flatten(2).transpose(1, 2)
        pos = (sine_positional_encoding(h, w, c, query.device) + self.level_embed).to(q.dtype)[None]
        eval_gen = None if self.training else torch.Generator().manual_seed(self.seed % 2**64)
        consistency, idx, k_ignore = [], None, None
        for block in self.blocks:
            if idx is None or self.training:
                idx = self._sample(labels, shots, eval_gen)
                k = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, c))
                k_labels = torch.gather(labels, 1, idx)  # the sampled tokens' own labels and flags
                k_ignore = None if ignore is None else torch.gather(ignore, 1, idx)
            q, consistent = block(q, pos, (h, w), k, k_labels, k_ignore)
            consistency.append(consistent)
        return q.transpose(1, 2).reshape(b, c, h, w), consistency


# ------------------------------------------------------------------------------------------------ the decoder
class CyCTRDecoder(nn.Module):
    """CyCTR's decoder on PriorPrototypeHead guidance (see the module docstring).

    Reads query_feat (B, D, h, w), prototype (B, D, 1, 1) or a map (B, D, h, w), prior (B, 1, h, w),
    support_feat (B, K, D, h, w), support_mask_feat (B, K, 1, h, w) and, if present, support_ignore_feat
    (B, K, 1, h, w): tokens where it is >= 0.5 are ignored keys (CELP's contrast pass with
    ``token_mask: pseudo_mask``: the pseudo-mask's 255 regions; absent = none). A guidance whose support is the query
    itself (CELP's latent branch: support_feat = query_feat[:, None], support_mask_feat = a pseudo-mask) works
    unchanged. Returns logits (B, 2, h, w), fused_query_feat (B, D, h, w) (the auxiliary support prediction
    reads it) and cycle_consistent (per block, (B, heads, T) bool over the sampled support tokens).
    """

    def __init__(
        self,
        dim: int = 256,
        num_blocks: int = 2,
        num_heads: int | None = None,
        num_points: int = 9,
        ffn_ratio: int = 3,
        dropout: float = 0.1,
        fg_tokens: int = 300,
        bg_tokens: int = 300,
        token_scale_1shot: Sequence[float] = (0.6, 4.0),
        token_scale_kshot: Sequence[float] = (0.6, 1.4),
        prior_channels: int = 1,
        num_classes: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim < 1 or num_blocks < 1 or num_points < 1 or fg_tokens < 1 or bg_tokens < 1:
            raise ConfigError(
                "decoder.dim, num_blocks, num_points, fg_tokens and bg_tokens must be >= 1; got "
                f"{dim}, {num_blocks}, {num_points}, {fg_tokens}, {bg_tokens}"
            )
        for name, rng in (("token_scale_1shot", token_scale_1shot), ("token_scale_kshot", token_scale_kshot)):
            if len(rng) != 2 or not 0 < rng[0] <= rng[1]:
                raise ConfigError(f"decoder.{name} must be [low, high] with 0 < low <= high; got {list(rng)}")
        self.query_merge = conv1x1_relu(2 * dim + prior_channels, dim)
        self.support_merge = conv1x1_relu(2 * dim, dim)
        self.transformer = CycleTransformer(
            dim, num_blocks, num_heads, num_points, ffn_ratio, dropout,
            fg_tokens, bg_tokens, token_scale_1shot, token_scale_kshot, seed,
        )  # fmt: skip
        self.fuse = conv1x1_relu(dim, dim)
        self.fuse_res = nn.Sequential(conv3x3_relu(dim), conv3x3_relu(dim))
        self.cls = classifier(dim, num_classes, 0.1)

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        query, proto, prior = guidance["query_feat"], guidance["prototype"], guidance["prior"]
        s, m = guidance["support_feat"], guidance["support_mask_feat"]
        b, k, d = s.shape[:3]
        size = query.shape[-2:]
        proto = proto.expand(-1, -1, *size) if proto.shape[-2:] == (1, 1) else resize(proto, size)
        q = self.query_merge(torch.cat([query, proto, resize(prior, size)], dim=1))
        # support tokens: each shot's feature merged with its own prototype, all shots concatenated
        s, m = s.flatten(0, 1), m.flatten(0, 1)
        s_proto = masked_average_pool(s, m)[:, :, None, None].expand(-1, -1, *s.shape[-2:])
        s = self.support_merge(torch.cat([s, s_proto], dim=1))
        tokens = s.view(b, k, d, -1).permute(0, 1, 3, 2).reshape(b, -1, d)  # B, K*hs*ws, D
        labels = (m >= 0.5).view(b, -1)
        ignore = guidance.get("support_ignore_feat")
        if ignore is not None:  # 255 tokens: background label (the reference's mask == 1), -10000 key bias
            ignore = (ignore >= 0.5).reshape(b, -1)
            labels = labels & ~ignore
        x, consistency = self.transformer(q, tokens, labels, shots=k, ignore=ignore)
        x = self.fuse(x)
        x = self.fuse_res(x) + x
        return {"logits": self.cls(x), "fused_query_feat": x, "cycle_consistent": consistency}


class SupportMaskPrediction(AuxLoss):
    """CyCTR's auxiliary support-mask prediction (training only, weight 1 in the reference): a query prototype
    is pooled under the query mask from conv1x1(fused query) + the reduced query feature, merged with each
    shot's reduced support feature, and a small head predicts the support mask; the loss (the main loss, the
    weighted Dice) is averaged over shots. It needs the query mask, so it runs here, not in the decoder.
    Reads outputs fused_query_feat, query_feat, support_feat and batch QUERY_MASK, SUPPORT_MASKS."""

    def __init__(
        self, dim: int = 256, weight: float = 1.0, loss: nn.Module | None = None, num_classes: int = 2
    ) -> None:
        super().__init__(weight)
        self.query_proj = conv1x1_relu(dim, dim)
        self.init_merge = conv1x1_relu(2 * dim, dim)
        self.beta = nn.Sequential(conv3x3_relu(dim), conv3x3_relu(dim))
        self.cls = classifier(dim, num_classes, 0.1)
        self.loss = loss if loss is not None else DiceLoss(smooth=0.0, squared=True, sigmoid_both=True)

    def support_logits(self, outputs: Mapping[str, Any], query_mask: torch.Tensor) -> torch.Tensor:
        fused, s = outputs["fused_query_feat"], outputs["support_feat"]  # (B, D, h, w), (B, K, D, h, w)
        b, k = s.shape[:2]
        qm = mask_to_feature((query_mask == 1).to(fused.dtype), fused.shape[-2:])
        q_proto = masked_average_pool(self.query_proj(fused) + outputs["query_feat"], qm)  # B, D
        q_proto = q_proto[:, None, :, None, None].expand(-1, k, -1, *s.shape[-2:]).flatten(0, 1)
        x = self.init_merge(torch.cat([s.flatten(0, 1), q_proto], dim=1))
        x = self.beta(x) + x
        return self.cls(x).view(b, k, -1, *s.shape[-2:])

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        logits = self.support_logits(outputs, batch[QUERY_MASK])
        return {"support_mask": self.loss(logits.flatten(0, 1), batch[SUPPORT_MASKS].flatten(0, 1))}


__all__ = [
    "CyCTRDecoder",
    "CycleCrossAttention",
    "CycleTransformer",
    "DeformableSelfAttention",
    "SupportMaskPrediction",
    "cycle_consistency_mask",
    "default_heads",
    "deformable_attention",
    "sample_support_tokens",
    "sine_positional_encoding",
]
