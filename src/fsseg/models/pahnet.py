"""PAHNet (Zou et al., "Balancing conservative prototype predictors and aggressive affinity learners"): the block
parts it adds to an affinity-learning host, and its auxiliary loss.

Reference facts: shared/notes/affinity-and-pahnet.md ("PAHNet"), corrected by round2-references.md §1.5
(tianyu-zou/PAHNet@37edd6b SCCAN_PAHNet/model/PAHNet_transformer.py, HDMNet_PAHNet/model/TransformerPlus.py,
MaskMultiheadAttention.py) and the supplement (shared/papers/pahnet-supplementary.txt). Written from those facts.

- `PrototypeEnhancement` (PFE, the reference's ``PrototypeEnhanced``): one per attention block, run before the
  block. Two query-adapted prototypes, one pooled with the block's own affinity mask M_aff, one with the frozen
  predictor's M_pro, each blended with the support foreground prototype by a cosine weight and injected through
  separate projections; returns the M_aff logits for the auxiliary loss.
- `WindowScoreCalibration` (ASC, SCCAN version): inside the query branch's window attention, the cross scores are
  re-weighted by W_score (per head: Linear(1, C) with bias on both sides) and masked by M_score (-inf for
  confident query-FG / support-BG and query-BG / support-FG pairs); the support branch's window self-attention
  masks FG-BG pairs with -inf.
- `QueryAxisScoreCalibration` (ASC, HDMNet version): W = alpha p_i m_j (Linear(1, C) without bias, one matrix
  for all heads) multiplies the cosine scores before the query-axis softmax; mismatched confident pairs are zeroed
  after it; the distillation weight averages the raw scores with weights g.
- `AffinityMaskLoss` (M_aff auxiliary loss): mean over blocks of CE on the softmax PROBABILITIES (the reference,
  ``form: probability_ce``) or BCE-with-logits on the logit difference (``form: bce_logits``).

Hosts take these parts by config (``decoder.block_enhancement`` / ``decoder.score_calibration``); without them a
host runs exactly its own code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.losses import AuxLoss

__all__ = [
    "AffinityMaskLoss",
    "PrototypeEnhancement",
    "QueryAxisScoreCalibration",
    "WindowScoreCalibration",
    "build_per_block",
    "confidence_levels",
]

GAP_EPS = 5e-4  # the reference's Weighted_GAP area epsilon
IGNORE_INDEX = 255


def build_per_block(spec: Any, count: int, option: str, **kwargs: Any) -> list[nn.Module] | None:
    """A block part from the config: None (absent), a factory (Hydra ``_partial_``: one built per block with
    ``kwargs``) or a list with exactly one module / factory per block (else ConfigError naming ``option``)."""
    if spec is None:
        return None
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != count:
            raise ConfigError(f"{option} lists {len(spec)} modules but the host has {count} attention blocks; give one per block")
        return [part if isinstance(part, nn.Module) else part(**kwargs) for part in spec]
    if isinstance(spec, nn.Module):
        raise ConfigError(f"{option} must be a factory (_partial_: true) or a list of {count} modules, one per block; got one module")
    if not callable(spec):
        raise ConfigError(f"{option} must be a factory (_partial_: true) or a list; got {type(spec).__name__}")
    return [spec(**kwargs) for _ in range(count)]


def _map(feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted_GAP on tokens: feat (B, N, C), mask (B, N) -> sum(f m) / (sum(m) + 5e-4), (B, C)."""
    return (feat * mask[..., None]).sum(dim=1) / (mask.sum(dim=1, keepdim=True) + GAP_EPS)


class PrototypeEnhancement(nn.Module):
    """PFE (PAHNet; reference ``PrototypeEnhanced``) on tokens. x (B, N, C) query, y (B, M, C) support (shots
    concatenated), support_mask (B, M) soft, m_pro (B, N) the predictor's query foreground probability.

        xn, yn = LN1(x), LN1(y);  Qs = Wq yn;  Kq = Wk xn;  Vq = Wv xn            (Linear C -> C, no bias)
        p_fg, p_bg = MAP(Qs, Ms), MAP(Qs, 1 - Ms)
        M_aff = softmax([t cos(Kq, p_bg), t cos(Kq, p_fg)])                        (t = 10)
        q1 = MAP(Vq, M_aff[fg]); s1 = (cos(q1, p_fg) + 1) / 2; P1 = s1 p_fg + (1 - s1) q1
        q2 = MAP(Vq, M_pro);     s2 likewise;                   P2 = s2 p_fg + (1 - s2) q2
        x_m = Wfx [Wx1 [x; P1]; Wx2 [x; P2]] + x;  y_m likewise                    (Linear 2C -> C, no bias)
        x_out = xn + FFN_x(LN2(x_m));  y_out = yn + FFN_y(LN2(y_m))                (the reference's LN1(x) base)

    Returns x_out, y_out and the M_aff logits (B, 2, N) ([background, foreground], before the softmax; None
    without the affinity branch). ``affinity`` / ``prototype`` switch the two branches (supplement Table 3: "M_aff
    only" / "M_pro only"); with one branch the final projections read C channels (fsseg's reading: the ablation's
    code is not public); a branch that is off builds no parameters (nothing without a gradient)."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, temperature: float = 10.0, affinity: bool = True,
        prototype: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        if dim < 1 or mlp_ratio <= 0:
            raise ConfigError(f"block_enhancement needs dim >= 1 and mlp_ratio > 0; got {dim}, {mlp_ratio}")
        if not (affinity or prototype):
            raise ConfigError("block_enhancement needs at least one of affinity / prototype (or block_enhancement=null)")
        self.temperature, self.affinity, self.prototype = float(temperature), bool(affinity), bool(prototype)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.v = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False) if affinity else None
        self.proj_x1 = nn.Linear(2 * dim, dim, bias=False) if affinity else None
        self.proj_y1 = nn.Linear(2 * dim, dim, bias=False) if affinity else None
        self.proj_x2 = nn.Linear(2 * dim, dim, bias=False) if prototype else None
        self.proj_y2 = nn.Linear(2 * dim, dim, bias=False) if prototype else None
        branches = int(affinity) + int(prototype)
        self.final_proj_x = nn.Linear(branches * dim, dim, bias=False)
        self.final_proj_y = nn.Linear(branches * dim, dim, bias=False)
        hidden = int(dim * mlp_ratio)
        self.ffn_x, self.ffn_y = (
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop), nn.Linear(hidden, dim), nn.Dropout(drop))
            for _ in range(2)
        )

    @staticmethod
    def _fuse(query_proto: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        s = (F.cosine_similarity(query_proto, fg, dim=1)[:, None] + 1) / 2  # PFE: (cos + 1) / 2
        return s * fg + (1 - s) * query_proto

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, support_mask: torch.Tensor, m_pro: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xn, yn = self.norm1(x), self.norm1(y)
        qs, vq = self.q(yn), self.v(xn)
        fg = _map(qs, support_mask)  # B, C
        protos, aff_logits = [], None
        if self.affinity:  # affinity branch: the block's own M_aff
            bg = _map(qs, 1 - support_mask)
            kq = self.k(xn)
            sim = torch.stack([F.cosine_similarity(kq, p[:, None], dim=-1) for p in (bg, fg)], dim=1)  # B, 2, N
            aff_logits = self.temperature * sim
            protos.append(self._fuse(_map(vq, aff_logits.softmax(dim=1)[:, 1]), fg))
        if self.prototype:  # prototype branch: the predictor's M_pro
            protos.append(self._fuse(_map(vq, m_pro), fg))
        projs_x = [p for p in (self.proj_x1, self.proj_x2) if p is not None]
        projs_y = [p for p in (self.proj_y1, self.proj_y2) if p is not None]

        def inject(t: torch.Tensor, projs: list[nn.Module], final: nn.Module) -> torch.Tensor:
            parts = [proj(torch.cat([t, p[:, None].expand_as(t)], dim=-1)) for proj, p in zip(projs, protos)]
            return final(torch.cat(parts, dim=-1)) + t

        x_m = inject(x, projs_x, self.final_proj_x)
        y_m = inject(y, projs_y, self.final_proj_y)
        return xn + self.ffn_x(self.norm2(x_m)), yn + self.ffn_y(self.norm2(y_m)), aff_logits


def confidence_levels(p: torch.Tensor, low: float = 0.3, high: float = 0.7) -> torch.Tensor:
    """ASC's t: p clamped to <= 1, then 0 below ``low``, 1 above ``high``, p itself in between."""
    p = p.clamp(max=1.0)
    return torch.where(p < low, torch.zeros_like(p), torch.where(p > high, torch.ones_like(p), p))


def _binary(m: torch.Tensor) -> torch.Tensor:
    return (m >= 0.5).to(m.dtype)  # the reference binarises the resized support mask at 0.5


def _check_levels(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"score_calibration needs 0 <= low <= high <= 1; got low={low}, high={high}")


class WindowScoreCalibration(nn.Module):
    """ASC, SCCAN version (one per SCCA block). For a query window's tokens i (predictor probability p_i) and the
    aligned support window's tokens j (binarised mask m_j):

        W_score[h, i, j] = <Lq(p_i)_h, Ls(m_j)_h>     (Lq, Ls: Linear(1, C) with bias, split into heads)
        M_score[i, j]    = -inf where t_i + m_j == 1, else 0
        cross'           = W_score * cross + M_score  (then ONE softmax with the self part, in SCCAttention)

    ``weight`` / ``mask`` switch W_score / M_score (Table 4); ``support_pairs``: the support branch's window
    self-attention gets -inf for FG-BG pairs. The self part of the query row is never masked, so no softmax row
    is all -inf; nor is a support row (a token always pairs with itself)."""

    def __init__(
        self, dim: int, heads: int, weight: bool = True, mask: bool = True, support_pairs: bool = True,
        low: float = 0.3, high: float = 0.7,
    ) -> None:  # fmt: skip
        super().__init__()
        if heads < 1 or dim % heads:
            raise ConfigError(f"score_calibration: decoder.num_heads ({heads}) must divide decoder.dim ({dim})")
        _check_levels(low, high)
        self.heads, self.low, self.high = int(heads), float(low), float(high)
        self.use_mask, self.support_pairs = bool(mask), bool(support_pairs)
        # no module when W_score is off: no parameter without a gradient (DDP, find_unused_parameters=False)
        self.proj_q = nn.Linear(1, dim) if weight else None
        self.proj_s = nn.Linear(1, dim) if weight else None

    def score_weight(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """p (N, n) clamped, m (N, k) binary -> W_score (N, heads, n, k)."""
        a = self.proj_q(p[..., None]).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        b = self.proj_s(m[..., None]).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        return a @ b.transpose(-2, -1)

    def score_mask(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """M_score (N, 1, n, k): -inf where t_i + m_j == 1, else 0."""
        t = confidence_levels(p, self.low, self.high)
        clash = (t[:, :, None] + m[:, None, :]) == 1
        return torch.zeros(clash.shape, dtype=p.dtype, device=p.device).masked_fill(clash, float("-inf"))[:, None]

    def calibrate(self, cross: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """cross (N, heads, n, k) cosine scores; p (N, n) predictor probability; m (N, k) soft support mask."""
        p, m = p.clamp(max=1.0).to(cross.dtype), _binary(m).to(cross.dtype)
        if self.proj_q is not None:
            cross = self.score_weight(p, m) * cross
        if self.use_mask:
            cross = cross + self.score_mask(p, m)
        return cross

    def support_bias(self, m: torch.Tensor) -> torch.Tensor | None:
        """m (N, n) soft support mask of a window -> (N, 1, n, n) with -inf on FG-BG pairs, or None when off."""
        if not self.support_pairs:
            return None
        mb = _binary(m)
        clash = (mb[:, :, None] + mb[:, None, :]) == 1
        return torch.zeros(clash.shape, dtype=m.dtype, device=m.device).masked_fill(clash, float("-inf"))[:, None]


class QueryAxisScoreCalibration(nn.Module):
    """ASC, HDMNet version (one per matching layer). scores S (B, heads, Nq, Ns) = cos / temperature:

        W[i, j] = <Lq(p_i), Ls(m_j)> = alpha p_i m_j      (Linear(1, C) without bias, one W for all heads)
        A       = softmax(W * S, over the QUERY axis);  A[t_i + m_j == 1] = 0 (after the softmax, no renormalisation)
        weight_i = sum_j S_ij g_ij / (sum_j g_ij + 1e-9)   (g = 2 where t_i + m_j is 0 or 2, 0 where 1, else t_i + m_j)

    ``weight`` / ``mask`` switch W / the zeroing (Table 4). No -inf anywhere: no softmax row or column can be
    all -inf."""

    def __init__(self, dim: int, weight: bool = True, mask: bool = True, low: float = 0.3, high: float = 0.7) -> None:
        super().__init__()
        _check_levels(low, high)
        self.low, self.high, self.use_mask = float(low), float(high), bool(mask)
        self.proj_q = nn.Linear(1, dim, bias=False) if weight else None
        self.proj_s = nn.Linear(1, dim, bias=False) if weight else None

    def score_weight(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """p (B, Nq) clamped, m (B, Ns) binary -> W (B, 1, Nq, Ns)."""
        return (self.proj_q(p[..., None]) @ self.proj_s(m[..., None]).transpose(-2, -1))[:, None]

    def pair_sum(self, p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (confidence_levels(p, self.low, self.high)[:, :, None] + m[:, None, :])[:, None]  # B, 1, Nq, Ns

    def attention(self, scores: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """scores (B, h, Nq, Ns); p (B, Nq); m (B, Ns) -> attention (B, h, Nq, Ns), distillation weight (B, Nq)."""
        p, m = p.clamp(max=1.0).to(scores.dtype), _binary(m).to(scores.dtype)
        w = scores if self.proj_q is None else self.score_weight(p, m) * scores
        attn = w.softmax(dim=-2)
        pair = self.pair_sum(p, m)
        if self.use_mask:
            attn = attn.masked_fill(pair == 1, 0.0)
        g = torch.where(pair == 0, torch.full_like(pair, 2.0), torch.where(pair == 1, torch.zeros_like(pair), pair))
        weight = ((scores * g).sum(-1) / (g.sum(-1) + 1e-9)).mean(dim=1)
        return attn, weight


class AffinityMaskLoss(AuxLoss):
    """PAHNet's M_aff auxiliary loss: mean over the blocks' M_aff logits (B, 2, h, w) of a loss against the query
    mask resized nearest to (h, w), 255 ignored; ``weight`` = lambda (1 in the reference).

    ``form``: ``probability_ce`` = the reference (cross-entropy applied to the softmax PROBABILITIES, i.e.
    BCE-with-logits(2 p_fg - 1): bounded, floor -log sigmoid(1) = 0.313); ``bce_logits`` = BCE-with-logits on the
    logit difference l_fg - l_bg (= CE on the logits)."""

    FORMS = ("probability_ce", "bce_logits")

    def __init__(self, weight: float = 1.0, key: str = "affinity_logits", form: str = "probability_ce") -> None:
        super().__init__(weight)
        if form not in self.FORMS:
            raise ConfigError(f"aux.affinity_mask.form must be one of {self.FORMS}; got {form!r}")
        self.key, self.form = key, form

    def term(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        logits = logits.float()
        if self.form == "probability_ce":
            return F.cross_entropy(logits.softmax(dim=1), y, ignore_index=IGNORE_INDEX)
        valid = y != IGNORE_INDEX
        diff = logits[:, 1] - logits[:, 0]
        loss = F.binary_cross_entropy_with_logits(diff, (y == 1).float(), reduction="none")
        return (loss * valid).sum() / valid.sum().clamp(min=1)

    def forward(self, outputs: Mapping[str, Any], batch, model) -> dict[str, torch.Tensor]:
        maps = outputs.get(self.key)
        if not maps:
            raise ConfigError(
                f"aux.affinity_mask reads output {self.key!r}, which the decoder does not produce (no PFE affinity "
                f"branch: decoder.block_enhancement null or affinity=false); drop the loss with ~aux.affinity_mask"
            )
        target = batch[QUERY_MASK]
        return {"aff": sum(self.term(m, target) for m in maps) / len(maps)}
