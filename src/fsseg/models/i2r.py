"""I2R (Fu et al.): CAM-based prior maps (PMGM), an attention decoder with a support branch, and directional
inconsistency masking (DICM) of the query->support cross-attention, on BAM's base learner and ensemble.

Reference facts: shared/notes/round2-references.md §1.2 and §2 (forypipi/I2R, model/BAM.py meta_forward,
model/SA.py, model/Decoder/CrossAttn.py, CAM_Generator/). The parts, composed by conf/method/i2r.yaml:

- `PMGMHead` (Sec. 3.2, Eqs. 1-11 up to the 1x1 merge): BAM's guidance (`PriorPrototypeHead` with the Gram
  shot weighting) plus, with ``pmgm=true``, the support class from the ImageNet head (Eq. 1), support and query
  CAMs (fsseg.models.cam), CAM+/CAM- regions (Eqs. 2-4), the refined prior (Eqs. 5-9) for the query and for
  each support, and the region-prototype maps X^c (Eq. 10).
- `I2RDecoder` (Sec. 3.3): init_merge (Eq. 11, shared by the query and the support branch), N blocks of
  self-attention, the first M with query->support cross-attention (Eq. 12-13) masked by ``attention_mask``
  (``dicm`` = Algorithm 1, ``cyctr`` = CyCTR's column rule, ``none``), residual convs, inner heads and the
  support branch's own head (supervised by the support masks: `fsseg.models.losses.SupportCE`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fsseg.data.batch import QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.cam import adaptive_thresholds, check_cam_method, class_activation_maps, normalise_cams
from fsseg.models.cyctr import cycle_consistency_mask
from fsseg.models.ops import mask_to_feature, masked_average_pool, resize, shot_priors
from fsseg.models.pfenet import PriorPrototypeHead

__all__ = [
    "ATTENTION_MASKS",
    "CrossAttentionBlock",
    "I2RDecoder",
    "PMGMHead",
    "SelfAttentionBlock",
    "attention_mask",
    "cam_regions",
    "dicm_mask",
    "masked_minmax",
]

ATTENTION_MASKS = ("none", "cyctr", "dicm")


# ----------------------------------------------------------------------------------------------------------
# PMGM
# ----------------------------------------------------------------------------------------------------------
def masked_minmax(x: torch.Tensor, region: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Min-max of ``x`` (N, 1, h, w) over the pixels of ``region`` (same shape, {0, 1}), zero outside it; an
    empty region gives zeros (I2R's ``torch_minmaxnormalize``, without its whole-batch special cases)."""
    inside = region > 0.5
    big = torch.finfo(x.dtype).max
    lo = torch.where(inside, x, torch.full_like(x, big)).flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    hi = torch.where(inside, x, torch.full_like(x, -big)).flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    out = (x - lo) / (hi - lo + eps)
    return torch.where(inside, out, torch.zeros_like(out))


def _cosine_to_vector(feat: torch.Tensor, proto: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cosine of every position of feat (N, C, h, w) with proto (N, C) -> (N, 1, h, w) (I2R's CossimCompute)."""
    f = feat / (feat.norm(dim=1, keepdim=True) + eps)
    p = proto / (proto.norm(dim=1, keepdim=True) + eps)
    return (f * p[:, :, None, None]).sum(dim=1, keepdim=True)


def cam_regions(cam: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Eqs. 2-4: CAM+ = cam > t (the reference's strict test; the paper writes >=), A1 = M and CAM+, A2 = M and
    CAM-. cam (N, H, W) in [0, 1], mask (N, H, W) {0, 1}, threshold (N,) -> bool (CAM+, A1, A2)."""
    pos = cam > threshold[:, None, None]
    inside = mask > 0.5
    return pos, inside & pos, inside & ~pos


class PMGMHead(PriorPrototypeHead):
    """BAM's guidance, refined by I2R's Prior Map Generation Module (``pmgm=true``).

    Args (beyond `PriorPrototypeHead`'s):
        encoder: the segmenter's encoder (passed by the segmenter); with PMGM it must keep its ImageNet head
            (``encoder.keep_head=true``): its ``tail`` classifies the ``cam_tap`` features.
        pmgm: false = BAM's guidance only (I2R's ablation baseline); the support branch then gets each shot's
            own max-cosine prior.
        cam_tap: encoder tap the CAMs are computed at (one feature index; I2R: layer3).
        cam_method: xgradcam (I2R) | gradcam | gradcampp | hirescam | bagcam (Table 6).
        cam_threshold: delta in (0, 1) (I2R: 0.7; CAM+ = cam > delta, the reference's strict comparison) or
            "adaptive" (per support, the delta maximising IoU with its mask, used for that shot's query too).
        region_source: Eq. 10's map X^c for the query: ``query_cam`` = p1 on the query's CAM+ and p2 on its CAM-
            (the reference) | ``support_regions`` = p1 A1^s + p2 A2^s as the paper writes it.
        prior_offsets: the vectors added to the prior prototypes before the cosine (Eqs. 7-8): ``fixed`` = drawn
            N(0, 1)/100 once and never trained (the reference: its embedding is not in the optimizer) |
            ``learnable`` (what the reference's code intended) | ``none``.
        prior_tap: the tap Eqs. 5-9 compare on: ``high`` = the reference (layer4, of the masked support with
            support_masking=deepest, while the CAMs are at layer3) | ``cam`` = the CAM layer itself (one reading of
            the paper, whose X_1 is "the" backbone feature).
        classifier: None = the encoder's ImageNet head (I2R) | a frozen linear classifier on GAP of the ``cam_tap``
            features (the "domain-specific classification head" of I2R's limitation section, trained on the base
            classes in stage 1: `fsseg.models.base_learner.load_domain_classifier`); the encoder then needs no head.
        map_eps: masked average pooling's area epsilon, for the support prototype and the region prototypes:
            1e-5 = I2R's ``Weighted_GAP`` (BAM's and PFENet's is 5e-4).
    """

    provides = (
        "query_feat", "support_feat", "support_mask_feat", "prototype", "prior", "support_prototype",
        "support_prior", "support_mask_tokens",
    )  # fmt: skip

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        encoder: nn.Module | None = None,
        reduce_dim: int = 256,
        dropout: float = 0.5,
        shared_reduction: bool = False,
        shot_weighting: nn.Module | None = None,
        pmgm: bool = True,
        cam_tap: str = "cam",
        cam_method: str = "xgradcam",
        cam_threshold: float | str = 0.7,
        region_source: str = "query_cam",
        prior_offsets: str = "fixed",
        classifier: nn.Module | None = None,
        prior_tap: str = "high",
        map_eps: float = 1e-5,
    ) -> None:
        super().__init__(tap_channels, reduce_dim, dropout, shared_reduction, True, shot_weighting, map_eps)
        self.pmgm = bool(pmgm)
        self.cam_method = check_cam_method(cam_method)
        if cam_threshold != "adaptive" and not (isinstance(cam_threshold, (int, float)) and 0 < cam_threshold < 1):
            raise ConfigError(f"head.cam_threshold must be in (0, 1) or 'adaptive'; got {cam_threshold!r}")
        self.cam_threshold = cam_threshold
        if region_source not in ("query_cam", "support_regions"):
            raise ConfigError(f"head.region_source must be 'query_cam' or 'support_regions'; got {region_source!r}")
        self.region_source = region_source
        if prior_offsets not in ("fixed", "learnable", "none"):
            raise ConfigError(f"head.prior_offsets must be 'fixed', 'learnable' or 'none'; got {prior_offsets!r}")
        self.prior_offsets = prior_offsets
        if prior_tap not in tap_channels:
            raise ConfigError(f"head.prior_tap {prior_tap!r} is not an encoder tap (taps: {sorted(tap_channels)})")
        self.prior_tap = prior_tap
        high = tap_channels[prior_tap]
        offsets = torch.randn(2, high) / 100.0  # the reference's nn.Embedding rows 0 and 2, N(0, 1)/100
        if prior_offsets == "learnable":
            self.offsets = nn.Parameter(offsets)
        else:
            self.register_buffer("offsets", offsets if prior_offsets == "fixed" else torch.zeros(2, high))
        self.cam_tap = cam_tap
        self._classify = None
        self.classifier = None if classifier is None else classifier.requires_grad_(False).eval()
        if self.pmgm and self.classifier is not None:
            if cam_tap not in tap_channels:
                raise ConfigError(f"head.cam_tap {cam_tap!r} is not an encoder tap (taps: {sorted(tap_channels)})")
            self._classify = self._domain_logits
        elif self.pmgm:
            if cam_tap not in tap_channels:
                raise ConfigError(f"head.cam_tap {cam_tap!r} is not an encoder tap (taps: {sorted(tap_channels)})")
            taps = getattr(encoder, "taps", {})
            if encoder is None or not getattr(encoder, "keep_head", False) or not hasattr(encoder, "tail"):
                raise ConfigError(
                    "head.pmgm=true needs the encoder's ImageNet classification head for the CAMs: set "
                    "encoder.keep_head=true (an encoder with a timm classifier)"
                )
            if len(taps.get(cam_tap, ())) != 1:
                raise ConfigError(f"encoder tap {cam_tap!r} must be one feature index for CAMs; got {taps.get(cam_tap)}")
            # a bound method, not a submodule: the encoder is registered once, by the segmenter
            self._classify = functools.partial(encoder.tail, taps[cam_tap][0])

    def _domain_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean(dim=(2, 3)))

    def train(self, mode: bool = True) -> PMGMHead:
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()
        return self

    @property
    def needs_autograd_at_eval(self) -> bool:  # the CAMs take gradients at evaluation too
        return self.pmgm

    def forward(
        self, query: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor], support_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        out = super().forward(query, support, support_mask)
        b, k = support_mask.shape[:2]
        size = out["query_feat"].shape[-2:]
        s_feat = out["support_feat"].flatten(0, 1)  # BK, D, h, w
        m_feat = out["support_mask_feat"].flatten(0, 1)
        out["support_prototype"] = masked_average_pool(s_feat, m_feat, self.map_eps).view(b, k, -1, 1, 1)
        tokens = resize(support_mask.flatten(0, 1)[:, None], size, mode="nearest") > 0.5
        out["support_mask_tokens"] = tokens.view(b, k, *size)
        if not self.pmgm:
            sh = support["high"].flatten(0, 1)  # BK, C, hh, ww (masked support when support_masking=deepest)
            mh = mask_to_feature(support_mask.flatten(0, 1), sh.shape[-2:])
            own = shot_priors(sh, sh[:, None], mh[:, None])[:, 0]  # each support's own BAM prior
            out["support_prior"] = resize(own, size).view(b, k, 1, *size)
            return out
        out.update(self._pmgm(query, support, support_mask, out))
        return out

    def _pmgm(self, query, support, support_mask, out) -> dict[str, torch.Tensor]:
        b, k, height, width = support_mask.shape
        size = out["query_feat"].shape[-2:]
        weights = out.get("shot_weights")
        if weights is None:
            weights = support_mask.new_full((b, k), 1.0 / k)
        m = support_mask.flatten(0, 1)  # BK, H, W
        # Eq. 1: the support's ImageNet class from its masked CAM-tap features; then the CAMs of the support
        # (unmasked) and of the query for that class, in one autograd call
        qc, sc = query[self.cam_tap], support[self.cam_tap].flatten(0, 1)
        qc = qc.repeat_interleave(k, dim=0)
        with torch.no_grad():
            classes = self._classify(sc * mask_to_feature(m, sc.shape[-2:])).argmax(dim=1)
        cams = class_activation_maps(self._classify, torch.cat([sc, qc]), torch.cat([classes, classes]), self.cam_method)
        cams = normalise_cams(cams, (height, width))
        cs, cq = cams.chunk(2)
        if self.cam_threshold == "adaptive":
            t = adaptive_thresholds(cs, m)
        else:
            t = cs.new_full((cs.shape[0],), float(self.cam_threshold))
        cs_pos, a1, a2 = cam_regions(cs, m, t)
        cq_pos = cq > t[:, None, None]
        a1, a2 = a1.float()[:, None], a2.float()[:, None]
        # Eqs. 5-9 on the prior tap: region prototypes of the support, cosine on each CAM region, min-max there
        sh, qh = support[self.prior_tap].flatten(0, 1).float(), query[self.prior_tap].float().repeat_interleave(k, dim=0)
        hsize = sh.shape[-2:]
        offsets = self.offsets.to(sh.dtype)
        p1h = masked_average_pool(sh, mask_to_feature(a1[:, 0], hsize), self.map_eps) + offsets[0]
        p2h = masked_average_pool(sh, mask_to_feature(a2[:, 0], hsize), self.map_eps) + offsets[1]

        def refined_prior(feat: torch.Tensor, cam_pos: torch.Tensor) -> torch.Tensor:
            region = resize(cam_pos.float()[:, None], hsize, mode="nearest")
            return masked_minmax(_cosine_to_vector(feat, p1h), region) + masked_minmax(
                _cosine_to_vector(feat, p2h), 1 - region
            )

        prior_q = resize(refined_prior(qh, cq_pos), size).view(b, k, 1, *size)
        prior_s = resize(refined_prior(sh, cs_pos), size).view(b, k, 1, *size)
        res = {
            "prior": (weights[:, :, None, None, None] * prior_q).sum(dim=1).clamp(0, 1),
            "support_prior": prior_s.clamp(0, 1),
        }
        # Eq. 10: region prototypes of the reduced support features, laid on the CAM regions
        s_feat = out["support_feat"].flatten(0, 1)
        p1 = masked_average_pool(s_feat, mask_to_feature(a1[:, 0], size), self.map_eps)[:, :, None, None]
        p2 = masked_average_pool(s_feat, mask_to_feature(a2[:, 0], size), self.map_eps)[:, :, None, None]
        cq_d, cs_d = resize(cq_pos.float()[:, None], size), resize(cs_pos.float()[:, None], size)
        if self.region_source == "query_cam":
            xq, xs = p1 * cq_d + p2 * (1 - cq_d), p1 * cs_d + p2 * (1 - cs_d)
        else:
            a1_d, a2_d = resize(a1, size), resize(a2, size)
            xq = xs = p1 * a1_d + p2 * a2_d
        res["region_feat"] = (weights[:, :, None, None, None] * xq.view(b, k, *xq.shape[1:])).sum(dim=1)
        res["support_region_feat"] = xs.view(b, k, *xs.shape[1:])
        return res


# ----------------------------------------------------------------------------------------------------------
# Attention masks (Algorithm 1 and CyCTR's rule), on detached attention scores
# ----------------------------------------------------------------------------------------------------------
def dicm_mask(
    attn: torch.Tensor,
    support_labels: torch.Tensor,
    query_labels: torch.Tensor,
    reference_cells: bool = False,
    keep_rows: bool = True,
) -> torch.Tensor:
    """DICM (Algorithm 1): for every support token j, i* = argmax_i attn[i, j]; where the labels of j and i*
    differ, the pair is masked: True at [i*, j]. attn (N, Nq, Ns); labels bool (N, Ns) and (N, Nq).

    ``keep_rows``: a query row whose every column would be masked keeps them all (no all -inf softmax row); found
    from per-row counts, without another pass over the (N, Nq, Ns) map.
    ``reference_cells``: the public code's cells instead: [j, i*] (transposed; needs Nq = Ns) and [0, 0] always.
    """
    i_star = attn.argmax(dim=1)  # N, Ns
    inconsistent = support_labels != query_labels.gather(1, i_star)
    mask = torch.zeros_like(attn, dtype=torch.bool)
    if not reference_cells:
        if keep_rows:  # a row can lose every column only if it is every column's i* and all of them disagree
            counts = torch.zeros_like(query_labels, dtype=torch.long).scatter_add_(1, i_star, inconsistent.long())
            inconsistent = inconsistent & (counts.gather(1, i_star) < attn.shape[2])
        return mask.scatter_(1, i_star[:, None, :], inconsistent[:, None, :])
    if attn.shape[1] != attn.shape[2]:
        raise ConfigError("decoder.dicm_reference_cells=true needs query and support token grids of one size")
    mask.scatter_(2, i_star[:, :, None], inconsistent[:, :, None])
    mask[:, 0, 0] = True
    return mask & ~mask.all(dim=2, keepdim=True) if keep_rows else mask


def attention_mask(
    attn: torch.Tensor,
    rule: str,
    support_labels: torch.Tensor,
    query_labels: torch.Tensor | None = None,
    reference_cells: bool = False,
) -> torch.Tensor | None:
    """The cells (N, Nq, Ns) set to -inf before the softmax, or None. ``cyctr``: every column whose support token
    is cycle-inconsistent (CyCTR Sec. 3.3; a sample whose every column is inconsistent keeps them all); ``dicm``:
    `dicm_mask`. No query row loses every column (no all -inf softmax row)."""
    if rule == "none":
        return None
    if rule == "cyctr":
        columns = ~cycle_consistency_mask(attn, support_labels)  # N, Ns
        columns = columns & ~columns.all(dim=1, keepdim=True)
        return columns[:, None, :].expand_as(attn)
    if rule == "dicm":
        return dicm_mask(attn, support_labels, query_labels, reference_cells)
    raise ConfigError(f"attention mask must be one of {list(ATTENTION_MASKS)}; got {rule!r}")


# ----------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------
class SelfAttentionBlock(nn.Module):
    """I2R's SA: one head, q/k/v with bias, scale dim^-0.5, dropout 0.1, post-LN; FFN dim -> 2 dim (GELU)."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = dim**-0.5
        self.drop = nn.Dropout(dropout)
        self.ln_attn, self.ln_ffn = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, D)
        a = (self.q(x) @ self.k(x).transpose(1, 2) * self.scale).softmax(dim=-1)
        x = self.ln_attn(x + self.drop(a @ self.v(x)))
        return self.ln_ffn(x + self.ffn(x))


class CrossAttentionBlock(nn.Module):
    """I2R's cross-attention (Eqs. 12-13): query tokens attend to support tokens, one head, q/k/v with bias;
    out = LN(softmax(A') V) + x, then out + [Linear 2 dim, GELU, Dropout, Linear, Dropout, LN](out)."""

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = dim**-0.5
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim), nn.Dropout(dropout),
            nn.LayerNorm(dim),
        )  # fmt: skip

    def scores(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.q(x) @ self.k(s).transpose(1, 2) * self.scale  # N, Nq, Ns

    def forward(self, x: torch.Tensor, s: torch.Tensor, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, Nq, D), s (N, Ns, D); ``mask(scores)`` -> bool cells to drop, or None. Returns the output and
        the detached scores."""
        a = self.scores(x, s)
        cells = mask(a.detach()) if mask is not None else None
        if cells is not None:
            a = a.masked_fill(cells, float("-inf"))
        out = self.ln(a.softmax(dim=-1) @ self.v(s)) + x
        return out + self.proj(out), a.detach()


def _res2(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 1),  # the reference's last 1x1 has a bias
    )  # fmt: skip


def _head(dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, num_classes, 1))


def _cls_meta(dim: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, dim, 3, padding=1, bias=False),
        nn.BatchNorm2d(dim), nn.ReLU(inplace=True), nn.Conv2d(dim, num_classes, 1),
    )  # fmt: skip


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


def _map(t: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *size)


class I2RDecoder(nn.Module):
    """I2R's decoder (see the module docstring).

    Args:
        dim: token width (the head's reduce_dim).
        num_decoders, num_cross_blocks: N attention blocks, the first M with cross-attention (the reference's
            config: 6 and 5; the paper's text: 5 and 4; Table S1's grid).
        support_branch: support tokens refined by their own self-attention blocks and supervised by the support
            masks (``support_logits``, ``support_inner_logits``); false: the cross-attention reads the merged
            support features as they are, nothing is predicted for the supports.
        attention_mask: training-time masking of the cross-attention: none | cyctr (CyCTR's columns, also at
            evaluation) | dicm (Algorithm 1, needs the query mask: training only).
        eval_attention_mask: with dicm, what evaluation applies: none (I2R, Table 3 row 7) | column (CyCTR's
            rule, row 6).
        dicm_reference_cells: the public code's transposed cells and always-masked [0, 0] (a reference bug,
            kept as an option; off).
        region_prototypes: the head provides X^c (PMGM on): init_merge takes 3 dim + 1 channels, else 2 dim + 1.
        detach_merge_input: init_merge's input detached as the reference does (the reductions then never train).
        report_mask_ratio: at evaluation, return what the training rule would mask per cross block
            (`diagnostics`: Table 5's ratios, measured with the query mask, never applied).
    """

    requires = ("query_feat", "prototype", "prior", "support_feat", "support_prototype", "support_prior",
                "support_mask_tokens")  # fmt: skip
    provides = ("logits", "inner_logits", "support_logits", "support_inner_logits")

    def __init__(
        self,
        dim: int = 256,
        num_decoders: int = 6,
        num_cross_blocks: int = 5,
        support_branch: bool = True,
        attention_mask: str = "dicm",
        eval_attention_mask: str = "none",
        dicm_reference_cells: bool = False,
        region_prototypes: bool = True,
        detach_merge_input: bool = True,
        num_classes: int = 2,
        dropout: float = 0.1,
        report_mask_ratio: bool = True,
    ) -> None:
        super().__init__()
        if num_decoders < 1 or not 0 <= num_cross_blocks <= num_decoders:
            raise ConfigError(
                f"decoder.num_cross_blocks must be in [0, decoder.num_decoders] and num_decoders >= 1; got "
                f"{num_cross_blocks} cross-attention blocks for {num_decoders} decoder blocks"
            )
        if attention_mask not in ATTENTION_MASKS:
            raise ConfigError(f"decoder.attention_mask must be one of {list(ATTENTION_MASKS)}; got {attention_mask!r}")
        if eval_attention_mask not in ("none", "column"):
            raise ConfigError(f"decoder.eval_attention_mask must be 'none' or 'column'; got {eval_attention_mask!r}")
        self.num_decoders, self.num_cross_blocks = int(num_decoders), int(num_cross_blocks)
        self.support_branch, self.attention_mask = bool(support_branch), attention_mask
        self.eval_attention_mask, self.dicm_reference_cells = eval_attention_mask, bool(dicm_reference_cells)
        self.region_prototypes, self.detach_merge_input = bool(region_prototypes), bool(detach_merge_input)
        self.report_mask_ratio = bool(report_mask_ratio)
        in_ch = (3 if region_prototypes else 2) * dim + 1
        self.init_merge = nn.Sequential(nn.Conv2d(in_ch, dim, 1, bias=False), nn.ReLU(inplace=True))  # Eq. 11
        n, m = self.num_decoders, self.num_cross_blocks
        self.query_blocks = nn.ModuleList(SelfAttentionBlock(dim, dropout) for _ in range(n))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(dim, dropout) for _ in range(m))
        self.res2 = nn.ModuleList(_res2(dim) for _ in range(n))
        self.query_heads = nn.ModuleList(_head(dim, num_classes) for _ in range(n - 1))
        self.cls_meta = _cls_meta(dim, num_classes)
        if self.support_branch:
            self.support_blocks = nn.ModuleList(SelfAttentionBlock(dim, dropout) for _ in range(n))
            self.support_heads = nn.ModuleList(_head(dim, num_classes) for _ in range(n - 1))
            self.support_cls = _cls_meta(dim, num_classes)

    def _merge(self, feat, proto, region, prior) -> torch.Tensor:
        parts = [feat, proto.expand(-1, -1, *feat.shape[-2:])]
        if self.region_prototypes:
            parts.append(region)
        x = torch.cat([*parts, prior], dim=1)
        return self.init_merge(x.detach() if self.detach_merge_input else x)

    def _rule(self) -> str:
        if self.training:
            return self.attention_mask
        if self.attention_mask == "cyctr" or (self.attention_mask == "dicm" and self.eval_attention_mask == "column"):
            return "cyctr"
        return "none"

    def forward(self, guidance: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
        q = guidance["query_feat"]
        b, _, h, w = q.shape
        s = guidance["support_feat"]
        k = s.shape[1]
        region = guidance.get("region_feat")
        s_region = guidance.get("support_region_feat")
        if self.region_prototypes and (region is None or s_region is None):
            raise ConfigError("decoder.region_prototypes=true needs PMGM's region maps: set head.pmgm=true")
        q = self._merge(q, guidance["prototype"], region, guidance["prior"])
        s = self._merge(
            s.flatten(0, 1), guidance["support_prototype"].flatten(0, 1),
            None if s_region is None else s_region.flatten(0, 1), guidance["support_prior"].flatten(0, 1),
        )  # fmt: skip
        s_labels = guidance["support_mask_tokens"].flatten(0, 1).flatten(1)  # BK, Ns
        rule = self._rule()
        q_labels = None
        if rule == "dicm":
            qm = getattr(context, "query_mask", None)
            if qm is None:
                raise ConfigError("decoder.attention_mask=dicm needs the query mask in training (episode context)")
            q_labels = (resize((qm == 1).float()[:, None], (h, w), mode="nearest") > 0.5).flatten(1)
            q_labels = q_labels.repeat_interleave(k, dim=0)
        mask = functools.partial(
            attention_mask, rule=rule, support_labels=s_labels, query_labels=q_labels,
            reference_cells=self.dicm_reference_cells,
        )  # fmt: skip
        qt, st = _tokens(q), _tokens(s)
        inner, s_inner, scores = [], [], []
        for i in range(self.num_decoders):
            qt = self.query_blocks[i](qt)
            if self.support_branch:
                st = self.support_blocks[i](st)
            if i < self.num_cross_blocks:
                out, a = self.cross_blocks[i](qt.repeat_interleave(k, dim=0), st, mask)
                qt = out.view(b, k, *out.shape[1:]).mean(dim=1)
                scores.append(a)
            qmap = _map(qt, (h, w))
            if i < self.num_decoders - 1:
                inner.append(self.query_heads[i](qmap))
                if self.support_branch:
                    s_inner.append(self.support_heads[i](_map(st, (h, w))).view(b, k, -1, h, w))
            qmap = self.res2[i](qmap) + qmap
            qt = _tokens(qmap)
        res: dict[str, Any] = {"logits": self.cls_meta(qmap), "inner_logits": inner}
        if self.support_branch:
            res["support_logits"] = self.support_cls(_map(st, (h, w))).view(b, k, -1, h, w)
            res["support_inner_logits"] = s_inner
        if not self.training and self.report_mask_ratio and self.attention_mask != "none" and scores:
            res["cross_attention_scores"] = scores  # for `diagnostics` only
        return res

    def diagnostics(self, out: Mapping[str, Any], batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Table 5: per cross block, the share of attention cells the training rule would mask, with the query
        mask of the batch (measured after the prediction, never applied). (B,) per block."""
        scores = out.get("cross_attention_scores")
        if not scores:
            return {}
        s_labels = out["support_mask_tokens"].flatten(0, 1).flatten(1)
        b, k = out["support_mask_tokens"].shape[:2]
        h, w = out["support_mask_tokens"].shape[-2:]
        q_labels = (resize((batch[QUERY_MASK] == 1).float()[:, None], (h, w), mode="nearest") > 0.5).flatten(1)
        q_labels = q_labels.repeat_interleave(k, dim=0)
        res = {}
        for i, a in enumerate(scores):
            cells = attention_mask(a, self.attention_mask, s_labels, q_labels, self.dicm_reference_cells)
            res[f"mask_ratio_cab{i}"] = cells.float().mean(dim=(1, 2)).view(b, k).mean(dim=1)
        return res
