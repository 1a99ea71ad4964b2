"""CELP (Zhao et al., "Contrastive Enhancement Using Latent Prototype for Few-Shot Segmentation") as a
training-only auxiliary loss. Inference is the baseline's (PFENet here): this module never runs at evaluation
(the segmenter calls auxiliary losses in ``training_step`` only), so inference cost equals PFENet's.

Latent Prototype Sampling (LPS, Sec. 4.2), for the whole batch at once. F^h = the query's high-level features
(encoder tap ``high``, layer4; resized to the decoder's feature size h x w if it differs), F^m = the reduced
mid-level query feature ``query_feat`` (the tensor the decoder consumes), M_q = "labelled" pixels: every
base-class pixel of the query (``QUERY_BASE_LABEL`` > 0, the target class included) and its target
foreground (``QUERY_MASK`` == 1).

    D(i, j) = cos(F^h(i), F^h(j))                                         (Eq. 1)
    N(i)    = sum_j [D(i, j) > delta] [M_q(j) = 0]                        (Eq. 2; j = i counts)
    P       = {i : N(i) >= sigma, M_q(i) = 0},  i* ~ Uniform(P)           (Eq. 3)
    M^1     = [D(i*, .) > delta] [M_q = 0]                  foreground    (Eq. 4)
    M^255   = 255 [M^1 = 0] [M_q = 0]                        ignored       (Eq. 5)
    M'      = M^1 + M^255              (labelled objects: 0 = background)  (Eq. 6)
    v_l     = sum_i F^m(i) [M'(i) = 1] / sum_i [M'(i) = 1]                 (Eq. 7)

Contrastive Enhancement (CE, Sec. 4.3): prior H' = minmax(cos(v_l, F^m)) (Eqs. 8-9); the SAME decoder
(``model.decoder``, every weight shared) reads [F^m, V_l, H'] (Eq. 10) and is supervised by M' (Eq. 13's L^2).
The contrast guidance is the main pass's guidance dict with ``prototype`` -> v_l (B, D, 1, 1), ``prior`` -> H'
(B, 1, h, w), ``support_feat`` -> F^m[:, None] (B, 1, D, h, w) and ``support_mask_feat`` -> M^1 (B, 1, 1, h, w):
the query is its own support, so a decoder that reads support tokens (CyCTR) needs no special case.

Resolution. Eqs. 1-4 and 7 run at the feature size h x w; the target M' (Eqs. 4-6) is built at the label size
H x W (fsseg's losses upsample logits to the label, as the main CE): a feature pixel is unlabelled when at most
``label_threshold`` of its bilinear footprint is labelled or ignored (255); M^1 is upsampled bilinearly and
thresholded at ``fg_threshold``; then labelled pixels are set to 0 and 255 pixels to 255 at full resolution,
so a labelled pixel is never foreground of M'. The paper does not say how masks change resolution; both
thresholds default to the reference code's 0.25 (notes §6).

Paper vs reference code (zhaoxiaoyu1995/CELP-Pytorch, CELP_PFENet/model/PFENet.py) and the defaults:

- sigma: the paper gives no value; the code keeps anchors with "> 10" similar pixels, i.e. sigma = 11 with
  Eq. 3's ">=" (default). Both count the anchor itself (the code's diagonal zeroing only hits pixel 0).
- No candidate: the code adds 11 to pixel 0's count ("avoid mistakes"), so pixel 0 is always a candidate,
  even a labelled one. fsseg follows Eq. 3: an image with P empty has an all-255 target and contributes no
  loss; a batch made only of such images gives exactly 0, never NaN (the CE is a sum over non-ignored pixels
  divided by their count, clamped to >= 1).
- 255 pixels: the code resizes its {0, 1, 255} label bilinearly and thresholds at 0.25, so any feature pixel
  touching an ignore pixel is excluded; fsseg thresholds the labelled-or-ignored fraction like the labelled one
  and keeps 255 pixels ignored in M' (the code may mark them foreground).
- Prior (Eq. 8): the paper writes cos(v_l, F^m (.) M'), "which sets the background in feature map to zeros",
  i.e. zero on the labelled objects; the code uses the plain cosine over every pixel. Default: the paper
  (``mask_prior: true``: F^m zeroed on labelled feature pixels; cosine scale-invariance makes M' = 255 act as 1).
  ``mask_prior: false`` is the code's plain cosine, which keeps the contrast pass's decoder inputs free of label
  information like the main pass's (the masked prior is 0 exactly where the pseudo-mask says background, a cue
  the decoder can learn instead of comparing prototype and features - worth an ablation).
- Loss weights (Eq. 13, L = L^1 + alpha L^2 + beta L^3): Sec. 5.2 reads alpha = 1.0 on the contrast loss and
  beta = 0.1 on the decoder's own loss; Table 6, the ablation text and the code (main + aux + 0.10 contrast)
  put 0.1 on the contrast loss and 1.0 on PFENet's deep supervision. Default: the code's reading (this module's
  ``weight`` = 0.1, ``aux.deep_supervision.weight`` = 1.0). No deep supervision on the contrast pass (the code
  computes its inner logits and drops them); ``deep_supervision: true`` adds it.
- CELP on CyCTR (CELP_CyCTR/model/CyCTR.py, CELPNet): the code hands the transformer its pseudo-label y_temp
  (1 / 0 on labelled objects / 255) as the support mask, so 255 tokens are background tokens masked out of the
  cross-attention. ``token_mask: pseudo_mask`` does that (``support_ignore_feat``); ``foreground`` (the
  constructor default, fsseg's earlier behaviour) hands over M^1 with everything else background. The code also
  shares one reduction for query and support (``head.shared_reduction``) and averages its weighted Dice over
  channels (``loss.channel_reduction: mean``, half of CyCTR's sum, so its 0.1 contrast CE weighs twice as much
  against the main loss as with the sum). The CELP-on-CyCTR paper recipes (celp_cyctr_pascal, celp_cyctr_coco)
  use all three reference forms; conf/method/celp_cyctr.yaml and the embedded recipe keep fsseg's.
- Prototype: masked average pooling with PFENet's +5e-4 on the area (the code's Weighted_GAP); the feature
  region of Eq. 7 is M^1 at feature size, as in the code. Gradients flow through v_l and H' into F^m.

Memory bound. The HW x HW similarity is never materialised: Eq. 2 is evaluated ``chunk_size`` rows at a time,
so the sampling's peak extra memory is about B x chunk_size x hw x 5 bytes (fp32 similarities plus the boolean
comparison) on top of B x hw x C for the normalised features; the anchor row (Eq. 4) is one (B, hw) product.
``chunk_size: null`` computes all rows at once, B x hw x hw x 5 bytes: 0.26 GB for PASCAL (60 x 60, B = 4),
1.7 GB for COCO 641 crops (81 x 81, B = 8). The default 1024 rows: 74 MB and 0.27 GB.

Randomness: the anchor of each image is drawn from this module's ``torch.Generator`` (seeded by ``seed``; its
state is saved in checkpoints through ``get_extra_state``), one uniform number per image per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_BASE_LABEL, QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.losses import AuxLoss, DiceLoss, safe_cross_entropy
from fsseg.models.ops import (
    SeededModule,
    choose_uniform,
    cosine_similarity_map,
    full_precision,
    mask_to_feature,
    masked_average_pool,
    minmax_normalise,
    resize,
    to_device,
)

LOSSES = ("ce", "dice")
TOKEN_MASKS = ("foreground", "pseudo_mask")
OPTION = "aux.latent_contrast"


# ------------------------------------------------------------------------------------------------ the equations
def label_regions(query_mask: torch.Tensor, base_label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labelled, ignored) boolean maps (B, H, W): labelled = base-class pixels or the target foreground (M_q),
    ignored = 255 in either label and not labelled."""
    labelled = ((base_label > 0) & (base_label != IGNORE_INDEX)) | (query_mask == 1)
    ignored = ((base_label == IGNORE_INDEX) | (query_mask == IGNORE_INDEX)) & ~labelled
    return labelled, ignored


def unlabelled_at(known: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[M_q = 0] at feature size (B, h*w) bool: at most ``threshold`` of the bilinear footprint is known
    (labelled or ignored) at full resolution."""
    return (mask_to_feature(known.float(), size) <= threshold).flatten(1)


@torch.no_grad()
def similar_counts(
    feat: torch.Tensor, unlabelled: torch.Tensor, delta: float, chunk_size: int | None = None
) -> torch.Tensor:
    """N(i) of Eq. 2 for every position: feat (B, N, C) L2-normalised, unlabelled (B, N) bool -> (B, N) int64.
    Eq. 1's similarities are computed ``chunk_size`` rows at a time (None: all rows at once)."""
    step = feat.shape[1] if chunk_size is None else int(chunk_size)
    keys = feat.transpose(1, 2)  # B, C, N
    counts = []
    for start in range(0, feat.shape[1], step):  # chunks of rows bound the memory, never a loop over pixels
        sim = torch.bmm(feat[:, start : start + step], keys)  # Eq. 1: B, c, N
        counts.append(((sim > delta) & unlabelled[:, None, :]).sum(dim=2))  # Eq. 2
    return torch.cat(counts, dim=1)


class LatentSample(NamedTuple):
    counts: torch.Tensor  # (B, N) N(i), Eq. 2
    candidates: torch.Tensor  # (B, N) bool, the set P of Eq. 3
    anchor: torch.Tensor  # (B,) i*, 0 where P is empty
    keep: torch.Tensor  # (B,) bool, P non-empty
    foreground: torch.Tensor  # (B, N) bool, M^1 of Eq. 4 (all False where P is empty)


@torch.no_grad()
def sample_latent_regions(
    high: torch.Tensor,
    unlabelled: torch.Tensor,
    delta: float,
    sigma: int,
    uniforms: torch.Tensor,
    chunk_size: int | None = None,
) -> LatentSample:
    """Eqs. 1-4 for the batch: high (B, C, h, w) features, unlabelled (B, h*w) bool, uniforms (B,) in [0, 1)
    (one per image, drawing i* uniformly from P). The similarities and their threshold at delta run in fp32 with
    autocast disabled: in bf16 the counts N(i) change on ~18% of the positions near delta."""
    with full_precision(high.device):
        feat = F.normalize(high.flatten(2).transpose(1, 2).float(), dim=2, eps=1e-7)  # B, N, C
        counts = similar_counts(feat, unlabelled, delta, chunk_size)  # Eqs. 1-2
        candidates = (counts >= sigma) & unlabelled  # Eq. 3
        keep = candidates.any(dim=1)
        anchor = choose_uniform(candidates, uniforms)
        a = feat[torch.arange(feat.shape[0], device=feat.device), anchor]  # B, C
        row = torch.bmm(a.unsqueeze(1), feat.transpose(1, 2)).squeeze(1)  # D(i*, .): B, N
        foreground = (row > delta) & unlabelled & keep.unsqueeze(1)  # Eq. 4
    return LatentSample(counts, candidates, anchor, keep, foreground)


def pseudo_mask(
    foreground: torch.Tensor,
    labelled: torch.Tensor,
    ignored: torch.Tensor,
    keep: torch.Tensor,
    fg_threshold: float = 0.25,
) -> torch.Tensor:
    """M' of Eqs. 4-6 at the label size (B, H, W) int64: 1 where the upsampled M^1 (B, 1, h, w) is >=
    ``fg_threshold``, 0 on labelled objects (always: they are never foreground), 255 elsewhere, on 255 pixels
    and on every pixel of an image without a candidate (keep False)."""
    fg = resize(foreground.float(), labelled.shape[-2:])[:, 0] >= fg_threshold
    ignore = torch.full_like(labelled, IGNORE_INDEX, dtype=torch.long)
    target = torch.where(fg & ~ignored, torch.ones_like(ignore), ignore)  # M^1 + M^255 (Eqs. 4-6)
    target = torch.where(labelled, torch.zeros_like(target), target)  # known objects: background
    return torch.where(keep.view(-1, 1, 1), target, ignore)


def latent_prototype(feat: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Eq. 7: masked average of feat (B, D, h, w) over M^1 (B, 1, h, w) -> v_l (B, D, 1, 1); 0 if M^1 is empty."""
    return masked_average_pool(feat, foreground.to(feat.dtype))[:, :, None, None]


def latent_prior(
    feat: torch.Tensor, prototype: torch.Tensor, keep_feat: torch.Tensor | None = None
) -> torch.Tensor:
    """Eqs. 8-9: min-max normalised cos(v_l, F^m) (B, 1, h, w); ``keep_feat`` (B, 1, h, w) zeroes F^m where it
    is 0 (Eq. 8's Hadamard product with M' read literally: labelled pixels). fp32, autocast disabled (a prior)."""
    with full_precision(feat.device):
        feat, prototype = feat.float(), prototype.float()
        if keep_feat is not None:
            feat = feat * keep_feat.to(feat.dtype)
        b, _, h, w = feat.shape
        return minmax_normalise(cosine_similarity_map(feat, prototype).view(b, 1, h, w))


# ------------------------------------------------------------------------------------------------ the branch
def _number(value: Any, name: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ConfigError(f"{OPTION}.{name} must be in {interval}; got {value!r}")
    return float(value)


class LatentContrast(SeededModule, AuxLoss):
    """CELP's LPS + CE branch (see the module docstring). Returns ``{"contrast": L^2}`` and, with
    ``deep_supervision``, ``{"deep_supervision": mean inner-classifier loss}``, both times ``weight``.

    Args:
        weight: weight of the contrast loss (Eq. 13; the code's 0.1, Table 6), >= 0; 0 skips the branch.
        delta: similarity threshold of Eqs. 2 and 4, in (-1, 1) (paper: 0.65, Table 5).
        sigma: minimum N(i) of an anchor (Eq. 3), an integer >= 1 (code: "> 10", i.e. 11).
        label_threshold: a feature pixel is unlabelled if at most this fraction of it is labelled or 255, [0, 1).
        fg_threshold: the upsampled M^1 is foreground where >= this, (0, 1].
        mask_prior: Eq. 8 literally (zero F^m on labelled pixels) instead of the code's plain cosine.
        loss: "ce" (the paper, also on CyCTR) or "dice" (on images with a candidate).
        deep_supervision: add the contrast pass's inner-classifier losses (off in the code).
        chunk_size: rows of the similarity matrix per step (memory bound), an integer >= 1 or None (all).
        seed: seed of the anchor generator; configs pass ${seed}.
        high_tap: encoder tap of F^h (layer4: "high"); ``outputs["query_high"]`` if the taps are absent.
        token_mask: the support mask of the contrast pass, read by a decoder with a support-token sampler
            (CyCTR). "foreground": M^1, everything else background. "pseudo_mask": the reference's (CELP_CyCTR
            CELPNet passes its pseudo-label with the 255 regions to the transformer): M^1 as foreground plus
            ``support_ignore_feat`` = [M' = 255] at feature size, tokens the decoder samples as background and
            masks out of the cross-attention (-10000 key bias). PFENet's FEM reads neither.
    """

    def __init__(
        self,
        weight: float = 0.1,
        delta: float = 0.65,
        sigma: int = 11,
        label_threshold: float = 0.25,
        fg_threshold: float = 0.25,
        mask_prior: bool = True,
        loss: str = "ce",
        deep_supervision: bool = False,
        chunk_size: int | None = 1024,
        seed: int = 0,
        high_tap: str = "high",
        token_mask: str = "foreground",
    ) -> None:
        weight = _number(weight, "weight", 0.0, math.inf, False, True)
        super().__init__(weight=weight)
        self.delta = _number(delta, "delta", -1.0, 1.0, True, True)
        if isinstance(sigma, bool) or not isinstance(sigma, int) or sigma < 1:
            raise ConfigError(f"{OPTION}.sigma must be an integer >= 1; got {sigma!r}")
        self.sigma = int(sigma)
        self.label_threshold = _number(label_threshold, "label_threshold", 0.0, 1.0, False, True)
        self.fg_threshold = _number(fg_threshold, "fg_threshold", 0.0, 1.0, True, False)
        if loss not in LOSSES:
            raise ConfigError(f"{OPTION}.loss must be one of {list(LOSSES)}; got {loss!r}")
        self.loss = str(loss)
        if token_mask not in TOKEN_MASKS:
            raise ConfigError(f"{OPTION}.token_mask must be one of {list(TOKEN_MASKS)}; got {token_mask!r}")
        self.token_mask = str(token_mask)
        self.dice = DiceLoss()
        bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        if chunk_size is not None and bad_chunk:
            raise ConfigError(f"{OPTION}.chunk_size must be an integer >= 1 or null; got {chunk_size!r}")
        self.chunk_size = chunk_size
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{OPTION}.seed must be an integer; got {seed!r}")
        self.mask_prior = bool(mask_prior)
        self.deep_supervision = bool(deep_supervision)
        self.high_tap = str(high_tap)
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)

    # ---------------------------------------------------------------- state (exact resume)
    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, delta={self.delta}, sigma={self.sigma}, loss={self.loss}, "
            f"token_mask={self.token_mask}"
        )

    # ---------------------------------------------------------------- forward
    def _uniforms(self, b: int, device: torch.device) -> torch.Tensor:
        """One uniform number in [0, 1) per image from the module's generator (the anchor draw of Eq. 3)."""
        return to_device(torch.rand(b, generator=self.generator, dtype=torch.float64), device)

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
        query = outputs["query_feat"]
        names = ["contrast", "deep_supervision"] if self.deep_supervision else ["contrast"]
        if self.weight == 0:  # the baseline exactly: no sampling, no random draw, no decoder pass
            return {k: query.new_zeros(()) for k in names}
        guidance, target, keep = self.contrast_guidance(outputs, batch)
        return self.terms_from_decoder(model.decoder(guidance), target, keep)

    def decoder_request(self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], model: nn.Module):
        """For ``model.batched_aux_decoder``: (the contrast pass's decoder input, a function from that pass's
        decoder output to this loss's terms), or None when the weight is 0 (then ``forward`` gives the zeros)."""
        if self.weight == 0:
            return None
        guidance, target, keep = self.contrast_guidance(outputs, batch)
        return guidance, lambda dec: self.terms_from_decoder(dec, target, keep)

    def terms_from_decoder(self, dec: Mapping[str, Any], target: torch.Tensor, keep: torch.Tensor) -> dict:
        terms = {"contrast": self._loss(dec["logits"], target, keep)}
        if self.deep_supervision:
            inner = [self._loss(x, target, keep) for x in dec.get("inner_logits", [])]
            terms["deep_supervision"] = torch.stack(inner).mean() if inner else dec["logits"].new_zeros(())
        return terms

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if self.loss == "ce":
            return safe_cross_entropy(logits, target)
        if not bool(keep.any()):
            return logits.sum() * 0.0
        return self.dice(logits[keep], target[keep])

    def contrast_guidance(
        self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
        """The decoder input of the contrast pass, its target M' (B, H, W) and keep (B,): P non-empty."""
        query = outputs["query_feat"]
        b, _, h, w = query.shape
        taps = outputs.get("query_taps") or {}
        high = resize(taps[self.high_tap] if self.high_tap in taps else outputs["query_high"], (h, w))
        labelled, ignored = label_regions(batch[QUERY_MASK], batch[QUERY_BASE_LABEL])
        unlabelled = unlabelled_at(labelled | ignored, (h, w), self.label_threshold)
        uniforms = self._uniforms(b, query.device)
        sample = sample_latent_regions(high, unlabelled, self.delta, self.sigma, uniforms, self.chunk_size)
        fg = sample.foreground.view(b, 1, h, w).to(query.dtype)  # M^1 at feature size
        target = pseudo_mask(fg, labelled, ignored, sample.keep, self.fg_threshold)  # Eqs. 4-6
        proto = latent_prototype(query, fg)  # Eq. 7
        keep_feat = None
        if self.mask_prior:  # Eq. 8 literally: F^m (.) M' is zero on the labelled objects (M' = 0) only
            keep_feat = mask_to_feature(labelled.to(query.dtype), (h, w)) <= self.label_threshold
        guidance = dict(outputs)
        guidance["prototype"] = proto
        guidance["prior"] = latent_prior(query, proto, keep_feat)  # Eqs. 8-9
        guidance["support_feat"] = query[:, None]  # the query is its own support
        guidance["support_mask_feat"] = fg[:, None]
        if self.token_mask == "pseudo_mask":  # the reference: M' with its 255 regions as the tokens' mask
            ignored_target = (target == IGNORE_INDEX).to(query.dtype)
            guidance["support_ignore_feat"] = mask_to_feature(ignored_target, (h, w))[:, None]  # B, 1, 1, h, w
        return guidance, target, sample.keep


__all__ = [
    "LatentContrast",
    "LatentSample",
    "label_regions",
    "latent_prior",
    "latent_prototype",
    "pseudo_mask",
    "sample_latent_regions",
    "similar_counts",
    "unlabelled_at",
]
