"""APANet (Chen et al., IEEE TMM) / SCNet (its conference version): the class-agnostic branch, as a training-only
auxiliary loss on PFENet. Inference is PFENet's: this module never runs at evaluation (the segmenter calls
auxiliary losses in ``training_step`` only), so the branch adds no inference cost.

Algorithm 1 of APANet, lines 4-14, for the whole batch at once (no Python loop over images or pixels):

1. partition the query (Eq. 4): cosine k-means (fsseg.models.kmeans, ``kmeans_iters`` = 10 rounds) of the
   high-level query features (encoder tap ``high`` = layer4, resized to the decoder's feature size if it
   differs) into ``n`` regions; or an ``spp_bins`` x ``spp_bins`` grid (APANet Table VII);
2. remove the foreground from every region (Eq. 5): M_k <- M_k - M_k n M^q;
3. region prototypes (Eq. 6): masked average pooling of the reduced mid-level query feature ``query_feat``
   (the very tensor the decoder consumes) over each region;
4. expansion E^q (Eq. 7): each region's prototype on the region's background pixels (positive pairs) and ONE
   randomly chosen region prototype on every foreground pixel (negative pairs);
5. the same decoder g_phi (all weights shared: ``model.decoder`` is called again with the guidance dict whose
   ``prototype`` is the expanded (B, D, h, w) map and whose ``prior`` is the class-agnostic prior below);
6. supervision 1 - M^q, 255 kept (Eq. 8-9).

Masks at feature resolution are soft, as PFENet's support masks (``ops.mask_to_feature``: bilinear): with
fg = soft(M^q == 1) and bg = soft(M^q == 0), the region masks are R_k * bg (Eq. 5, which also drops the 255
"ignore" pixels: they are neither foreground nor known background) and the expanded map is
P = sum_k R_k (1 - fg) p_k + (1 - sum_k R_k (1 - fg)) p_r: each pixel carries its region's prototype in
proportion to how much of it is not foreground and the random prototype p_r for the rest (exactly p_k on
background pixels, exactly p_r on foreground pixels; 255 pixels carry their region's prototype, and their
target is ignored).

Design decisions (where the papers are silent or ambiguous):

- g_phi is PFENet's whole decoder (``decoder=fem``: FEM with the prior, inner classifiers, final classifier),
  although Sec. IV-B describes it as "a 3 x 3 convolution and a 1 x 1 convolution with 2 output channels" (PFENet's
  final classifier): the papers' lambda = 0 baseline rows are PFENet's published numbers (docs/notes.md).

- Loss wiring (Eq. 9, L = (1 - lambda) L1 + lambda L2). ``lambda_`` is this module's weight (``AuxLoss.weight``);
  the main-loss weight must be 1 - lambda. conf/method/apanet.yaml sets both from ONE key, ``apanet_lambda``,
  through the OmegaConf resolver ``fsseg.one_minus`` registered by this module (``register_resolvers``):
  ``model.main_loss_weight: ${fsseg.one_minus:${apanet_lambda}}``. At the first training step the module checks
  ``model.main_loss_weight == 1 - lambda_`` and raises ConfigError otherwise (``check_main_loss_weight``).
- Deep supervision. L1 is PFENet's whole loss (CE + FEM inner supervision, as in the lambda = 0 baseline
  whose numbers the papers quote), so the method config scales PFENet's ``deep_supervision`` by 1 - lambda too,
  and L2 mirrors it: CE of the class-agnostic logits plus the mean CE of the class-agnostic pass's FEM inner
  classifiers against 1 - M^q (``deep_supervision: true``; terms ``ce`` and ``deep_supervision``). Then
  L = (1 - lambda) L_PFENet(support->query, M^q) + lambda L_PFENet(query->query, 1 - M^q).
- Prior of the class-agnostic pass (``prior``). PFENet's decoder also reads a prior map. ``region`` (default):
  per pixel, the cosine between its high-level feature and the mean high-level feature of the (foreground-
  removed) region whose prototype it is paired with, blended like P, min-max normalised per image as PFENet's
  prior. It keeps the prior's meaning of the main pass ("high-level similarity of this pixel to what the
  prototype stands for") at O(n h w C) cost. The mean, not PFENet's max over the region's pixels: every
  background pixel belongs to its own region, so the max would be its self-similarity, 1, everywhere on the
  positives - a giveaway. ``query_prior``: the main pass's class prior (support-foreground similarity; it
  points at the foreground, i.e. contradicts the 1 - M^q target). ``zeros``: a constant map the main pass never
  shows the decoder.
- Random negative prototype: drawn uniformly per image among the regions left non-empty by Eq. 5 (background
  area >= ``MIN_REGION_AREA`` = 0.5 feature pixel) from this module's ``torch.Generator`` (seeded by ``seed``;
  its state is saved in checkpoints through ``get_extra_state`` so a resumed run draws the same numbers). The
  same generator seeds k-means. Empty regions take p_r for their (255 / boundary) pixels.
- Empty background: an image whose regions are all empty after Eq. 5 (its background is empty at feature
  resolution: the object fills the crop, or everything else is 255) contributes no class-agnostic loss (its
  target is all 255); a batch made only of such images gives a loss of exactly 0, never NaN. With
  ``source: support`` the same holds for an empty support background (no prototype to pair).
- n = 0 is the baseline (Table IV row 0): the branch is off and returns zero terms; it needs lambda = 0 (else
  the main loss would be scaled by 1 - lambda with no branch) - ConfigError otherwise. lambda = 0 also skips
  the branch entirely (no k-means, no random draw, no decoder pass), so apanet_lambda=0 trains exactly PFENet.
- ``source: support`` (APANet Fig. 1(b), Table V; SCNet Table 4): ONE class-agnostic prototype from the support
  background (masked average of the reduced support features over all shots' background), paired with every
  query pixel (background: positive; foreground: negative, as the random choice among one prototype). Needs
  n = 1 and ``partition: kmeans`` - the papers define it only so; ConfigError otherwise. ``source: query`` with
  n = 1 is Fig. 1(c); n >= 2 is Fig. 1(d), the method.
- ``cluster_on``: ``all`` (default, the papers: "cluster F^q" / "group the entire query feature map", then
  Eq. 5) or ``background`` (k-means on the background pixels only, so all n clusters split the background;
  foreground and 255 pixels then carry p_r). Ignored with ``partition: spp``.
- CE of the branch is the pixel mean over non-ignored pixels of the batch (as the main CE), with an empty
  denominator giving 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_MASK, SUPPORT_MASKS
from fsseg.errors import ConfigError
from fsseg.models.kmeans import cosine_kmeans, grid_partition
from fsseg.models.losses import AuxLoss, safe_cross_entropy
from fsseg.models.ops import (
    MAP_EPS,
    SeededModule,
    choose_uniform,
    full_precision,
    mask_to_feature,
    minmax_normalise,
    resize,
    to_device,
)
from fsseg.resolvers import register_resolvers

PARTITIONS = ("kmeans", "spp")
SOURCES = ("query", "support")
PRIORS = ("region", "query_prior", "zeros")
CLUSTER_ON = ("all", "background")
MIN_REGION_AREA = 0.5  # background area (in feature pixels) below which a region counts as empty


register_resolvers()  # ${fsseg.one_minus:x} for conf/method/apanet.yaml (fsseg/resolvers.py)


# ------------------------------------------------------------------------------------------------ the equations
def one_hot_regions(labels: torch.Tensor, num_regions: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Label map (B, h, w) in [0, n) or -1 -> region indicator masks (B, n, h, w); -1 pixels in no region."""
    oh = F.one_hot(labels.clamp(min=0), num_regions).permute(0, 3, 1, 2).to(dtype)
    return oh * (labels >= 0).unsqueeze(1).to(dtype)


def remove_foreground(regions: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Eq. 5, M_k <- M_k - M_k n M^q: region masks (B, n, h, w) times the background mask (B, 1, h, w).

    With no 255 pixels background = 1 - foreground, so this is exactly M_k (1 - M^q); 255 pixels (neither
    foreground nor known background) leave the regions too."""
    return regions * background


def region_prototypes(
    feat: torch.Tensor, masks: torch.Tensor, eps: float = MAP_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: masked average pooling of feat (B, D, h, w) over every mask (B, n, h, w) -> prototypes (B, n, D)
    = sum(f m) / (sum(m) + eps) (PFENet's MAP) and areas (B, n) = sum(m)."""
    masks = masks.to(feat.dtype)
    area = masks.sum(dim=(2, 3))
    num = torch.einsum("bdhw,bnhw->bnd", feat, masks)
    return num / (area.unsqueeze(2) + eps), area


def expand_prototypes(
    prototypes: torch.Tensor, regions: torch.Tensor, foreground: torch.Tensor, negative: torch.Tensor
) -> torch.Tensor:
    """E^q of Eq. 7: prototypes (B, n, D), region indicators (B, n, h, w) (disjoint), foreground (B, 1, h, w)
    in [0, 1], negative (B,) -> the expanded map (B, D, h, w): p_k on region k's non-foreground part, p_r
    (r = negative) on the foreground and on pixels in no region."""
    positive = regions.to(prototypes.dtype) * (1.0 - foreground.to(prototypes.dtype))  # B, n, h, w
    p_neg = prototypes[torch.arange(prototypes.shape[0], device=prototypes.device), negative]  # B, D
    rest = 1.0 - positive.sum(dim=1, keepdim=True)  # B, 1, h, w
    return torch.einsum("bnhw,bnd->bdhw", positive, prototypes) + rest * p_neg[:, :, None, None]


def agnostic_target(query_mask: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """1 - M^q with 255 kept (B, H, W); images with keep False are all 255 (no loss)."""
    target = torch.where(query_mask == IGNORE_INDEX, query_mask, 1 - query_mask)
    if keep is not None:
        target = torch.where(keep.view(-1, 1, 1), target, torch.full_like(target, IGNORE_INDEX))
    return target


# ------------------------------------------------------------------------------------------------ the branch
def _int_at_least(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"aux.class_agnostic.{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"aux.class_agnostic.{name} must be one of {list(allowed)}; got {value!r}")
    return str(value)


class ClassAgnosticBranch(SeededModule, AuxLoss):
    """APANet/SCNet's class-agnostic branch (see the module docstring). Returns ``{"ce": L2_ce}`` and, with
    ``deep_supervision``, ``{"deep_supervision": mean inner CE}``; the segmenter multiplies both by
    ``weight`` = ``lambda_``.

    Args:
        lambda_: lambda of Eq. 9, in [0, 1]; the model's main_loss_weight must be 1 - lambda_.
        n: regions of the query (k-means clusters), >= 0; 0 = the branch is off (needs lambda_ = 0).
        partition: "kmeans" (Eq. 4) or "spp" (spp_bins x spp_bins grid, Table VII; n then only needs >= 1).
        spp_bins: a of the a x a grid, >= 1.
        source: "query" (Fig. 1(c)/(d)) or "support" (Fig. 1(b): one support-background prototype, n = 1).
        prior: prior map of the class-agnostic pass: "region", "query_prior" or "zeros".
        cluster_on: "all" pixels (the papers) or "background" pixels only.
        kmeans_iters: k-means rounds (the papers: 10).
        deep_supervision: add the class-agnostic pass's FEM inner-classifier CE (mirrors L1).
        seed: seed of the branch's generator (k-means seeds, random negative prototype); configs pass ${seed}.
        high_tap: encoder tap clustered (layer4: "high").
        check_main_loss_weight: raise ConfigError at the first step if model.main_loss_weight != 1 - lambda_.
        kmeans_early_stop: stop k-means at a fixed point (a host sync per round; same labels as all rounds);
            null = on CPU only, so a CUDA step has no host sync (fsseg.models.kmeans).
    """

    def __init__(
        self,
        lambda_: float = 0.5,
        n: int = 3,
        partition: str = "kmeans",
        spp_bins: int = 4,
        source: str = "query",
        prior: str = "region",
        cluster_on: str = "all",
        kmeans_iters: int = 10,
        deep_supervision: bool = True,
        seed: int = 0,
        high_tap: str = "high",
        check_main_loss_weight: bool = True,
        kmeans_early_stop: bool | None = None,
    ) -> None:
        if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float)) or not 0.0 <= float(lambda_) <= 1.0:
            raise ConfigError(
                f"aux.class_agnostic.lambda_ (APANet's lambda, Eq. 9) must be in [0, 1]; got {lambda_!r}"
            )
        super().__init__(weight=float(lambda_))
        self.lambda_ = float(lambda_)
        self.n = _int_at_least(n, "n", 0)
        self.partition = _choice(partition, "partition", PARTITIONS)
        self.spp_bins = _int_at_least(spp_bins, "spp_bins", 1)
        self.source = _choice(source, "source", SOURCES)
        self.prior = _choice(prior, "prior", PRIORS)
        self.cluster_on = _choice(cluster_on, "cluster_on", CLUSTER_ON)
        self.kmeans_iters = _int_at_least(kmeans_iters, "kmeans_iters", 1)
        self.deep_supervision = bool(deep_supervision)
        self.high_tap = str(high_tap)
        self.check_main_loss_weight = bool(check_main_loss_weight)
        if kmeans_early_stop not in (None, True, False):
            raise ConfigError(f"aux.class_agnostic.kmeans_early_stop must be true, false or null; got {kmeans_early_stop!r}")
        self.kmeans_early_stop = kmeans_early_stop
        if self.n == 0 and self.lambda_ > 0:
            raise ConfigError(
                f"aux.class_agnostic.n=0 is PFENet's baseline (APANet Table IV) and needs lambda_=0 "
                f"(apanet_lambda=0), else the main loss is scaled by 1 - lambda with no branch; got lambda_={lambda_}"
            )
        if self.source == "support" and (self.n != 1 or self.partition != "kmeans"):
            raise ConfigError(
                "aux.class_agnostic.source=support (APANet Fig. 1(b)) is defined for ONE support-background "
                f"prototype: needs n=1 and partition=kmeans; got n={self.n}, partition={self.partition!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"aux.class_agnostic.seed must be an integer; got {seed!r}")
        self.generator = torch.Generator().manual_seed(int(seed) % 2**64)
        self._weights_checked = False

    # ---------------------------------------------------------------- state (exact resume)
    def extra_repr(self) -> str:
        return (
            f"lambda_={self.lambda_}, n={self.n}, partition={self.partition}, spp_bins={self.spp_bins}, "
            f"source={self.source}, prior={self.prior}, cluster_on={self.cluster_on}"
        )

    @property
    def active(self) -> bool:
        return self.n > 0 and self.lambda_ > 0

    @property
    def num_regions(self) -> int:
        if self.source == "support":
            return 1
        return self.spp_bins**2 if self.partition == "spp" else self.n

    def _check_weights(self, model: nn.Module) -> None:
        if self._weights_checked or not self.check_main_loss_weight:
            return
        main = getattr(model, "main_loss_weight", None)
        if main is not None and not math.isclose(float(main), 1.0 - self.lambda_, abs_tol=1e-6):
            raise ConfigError(
                f"model.main_loss_weight={main} but APANet Eq. 9 needs 1 - lambda = {1.0 - self.lambda_} "
                f"(aux.class_agnostic.lambda_={self.lambda_}); set both from apanet_lambda "
                "(conf/method/apanet.yaml) or pass check_main_loss_weight=false"
            )
        self._weights_checked = True

    # ---------------------------------------------------------------- forward
    def _uniform(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return to_device(torch.rand(shape, generator=self.generator, dtype=torch.float64), device)

    def forward(self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
        query = outputs["query_feat"]
        zero = query.new_zeros(())
        names = ["ce", "deep_supervision"] if self.deep_supervision else ["ce"]
        if not self.active:
            return {k: zero for k in names}
        self._check_weights(model)
        guidance, target = self.class_agnostic_guidance(outputs, batch)
        return self.terms_from_decoder(model.decoder(guidance), target)

    def decoder_request(self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor], model: nn.Module):
        """For ``model.batched_aux_decoder``: (the class-agnostic pass's decoder input, a function from that pass's
        decoder output to this loss's terms), or None when the branch is off (then ``forward`` gives the zeros)."""
        if not self.active:
            return None
        self._check_weights(model)
        guidance, target = self.class_agnostic_guidance(outputs, batch)
        return guidance, lambda dec: self.terms_from_decoder(dec, target)

    def terms_from_decoder(self, dec: Mapping[str, Any], target: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {"ce": safe_cross_entropy(dec["logits"], target)}
        if self.deep_supervision:
            inner = list(dec.get("inner_logits", []))
            terms["deep_supervision"] = (
                torch.stack([safe_cross_entropy(x, target) for x in inner]).mean()
                if len(inner)
                else dec["logits"].new_zeros(())
            )
        return terms

    def class_agnostic_guidance(
        self, outputs: Mapping[str, Any], batch: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The decoder input of the class-agnostic pass (the main guidance with ``prototype`` = E^q map and
        ``prior`` replaced) and its target 1 - M^q (255 kept, images with an empty background all 255)."""
        query = outputs["query_feat"]
        b, _, h, w = query.shape
        size = (h, w)
        label = batch[QUERY_MASK]
        fg = mask_to_feature((label == 1).to(query.dtype), size)  # B, 1, h, w
        bg = mask_to_feature((label == 0).to(query.dtype), size)
        need_high = self.prior == "region" or (self.source == "query" and self.partition == "kmeans" and self.n > 1)
        # the high-level features feed k-means and the region prior: fp32 (not bf16) under mixed precision
        high_dtype = torch.promote_types(query.dtype, torch.float32)
        high = resize(outputs["query_taps"][self.high_tap].to(high_dtype), size) if need_high else None

        if self.source == "query":
            regions = one_hot_regions(self.partition_labels(high, bg), self.num_regions, query.dtype)
            masks = remove_foreground(regions, bg)  # Eq. 5
            protos, area = region_prototypes(query, masks)  # Eq. 6
            if self.prior == "region":
                with full_precision(high.device):
                    high_protos = region_prototypes(high, masks.to(high.dtype))[0]
            else:
                high_protos = None
        else:  # one prototype from the support background, K shots pooled
            sfeat = outputs["support_feat"]  # B, K, D, h, w
            sbg = mask_to_feature((batch[SUPPORT_MASKS] == 0).to(query.dtype), sfeat.shape[-2:])  # B, K, 1, h, w
            regions = query.new_ones(b, 1, h, w)
            area = sbg.sum(dim=(1, 2, 3, 4)).unsqueeze(1)  # B, 1
            protos = ((sfeat * sbg).sum(dim=(1, 3, 4)) / (area + MAP_EPS)).unsqueeze(1)  # B, 1, D
            high_protos = None
            if self.prior == "region":
                sh = outputs["support_taps"][self.high_tap]  # B, K, C, h', w'
                sh = resize(sh.flatten(0, 1), sbg.shape[-2:]).view(*sh.shape[:3], *sbg.shape[-2:]).to(query.dtype)
                high_protos = ((sh * sbg).sum(dim=(1, 3, 4)) / (area + MAP_EPS)).unsqueeze(1)

        valid = area >= MIN_REGION_AREA  # B, n
        keep = valid.any(dim=1)
        negative = choose_uniform(valid, self._uniform((b,), query.device))
        protos = self._fill_empty(protos, valid, negative)
        prototype_map = expand_prototypes(protos, regions, fg, negative)  # Eq. 7 (E^q)

        if self.prior == "region":
            prior = self._region_prior(high, self._fill_empty(high_protos, valid, negative), regions, fg, negative)
        elif self.prior == "query_prior":
            prior = outputs["prior"]
        else:
            prior = torch.zeros_like(outputs["prior"])
        guidance = dict(outputs)
        guidance["prototype"] = prototype_map
        guidance["prior"] = prior
        return guidance, agnostic_target(label, keep)

    def partition_labels(self, high: torch.Tensor | None, background: torch.Tensor) -> torch.Tensor:
        """Region label map (B, h, w) of the query: k-means clusters of ``high`` or the SPP grid; -1 = no region."""
        b, _, h, w = background.shape
        if self.partition == "spp":
            return grid_partition(h, w, self.spp_bins, device=background.device).expand(b, h, w)
        mask = (background[:, 0] >= 0.5) if self.cluster_on == "background" else None
        if self.n == 1:
            labels = torch.zeros(b, h, w, dtype=torch.long, device=background.device)
            return labels if mask is None else torch.where(mask, labels, torch.full_like(labels, -1))
        return cosine_kmeans(
            high, self.n, self.kmeans_iters, mask=mask, generator=self.generator, early_stop=self.kmeans_early_stop
        ).labels

    @staticmethod
    def _fill_empty(protos: torch.Tensor, valid: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Empty regions take the random prototype p_r (only their 255 / foreground-boundary pixels see it)."""
        p_neg = protos[torch.arange(protos.shape[0], device=protos.device), negative]
        return torch.where(valid.unsqueeze(2), protos, p_neg.unsqueeze(1))

    @staticmethod
    def _region_prior(
        high: torch.Tensor, high_protos: torch.Tensor, regions: torch.Tensor, fg: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        """Cosine of each pixel's high-level feature to the mean high-level feature of the region it is paired
        with (blended like the prototype map), min-max normalised per image: (B, 1, h, w). fp32 with autocast
        disabled (a prior, as PFENet's)."""
        with full_precision(high.device):
            dt = torch.promote_types(high.dtype, torch.float32)
            high, high_protos, regions, fg = high.to(dt), high_protos.to(dt), regions.to(dt), fg.to(dt)
            hn = F.normalize(high, dim=1, eps=1e-7)
            pn = F.normalize(high_protos, dim=2, eps=1e-7)
            cos = torch.einsum("bchw,bnc->bnhw", hn, pn)  # B, n, h, w
            positive = regions * (1.0 - fg)
            c_neg = cos[torch.arange(cos.shape[0], device=cos.device), negative].unsqueeze(1)  # B, 1, h, w
            prior = (positive * cos).sum(dim=1, keepdim=True) + (1.0 - positive.sum(dim=1, keepdim=True)) * c_neg
            return minmax_normalise(prior)


__all__ = [
    "ClassAgnosticBranch",
    "agnostic_target",
    "expand_prototypes",
    "one_hot_regions",
    "region_prototypes",
    "register_resolvers",
    "remove_foreground",
]
