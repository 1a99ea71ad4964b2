"""BAM (Lang et al., CVPR 2022): a frozen base learner, a PFENet-style meta learner and their ensemble.

Reference facts: shared/notes/round2-references.md §1.1 (chunbolang/BAM@c0f935c, model/BAM.py, PSPNet.py,
ASPP.py, PPM.py). The parts, each a plain module composed by config (conf/method/bam.yaml):

- `BaseLearner`: PSPNet's pyramid pooling (bins 1, 2, 3, 6) and classifier (3x3 conv 512 + BN + ReLU +
  Dropout2d 0.1 + 1x1 to 1 + base classes) on the encoder's deepest tap. Trained in stage 1
  (`fsseg.models.base_learner`), frozen in stage 2 (`FrozenSubModel`).
- `GramShotWeighting`: the scene difference ||G_q - G_s||_F / C of low-level features (Gram = channel cosine)
  and, with K > 1 shots, the learnt re-weighting of prototypes and priors from the sorted differences.
- `BAMMetaDecoder`: init_merge (query, prototype, prior) -> ASPP -> res1 -> res2 (residual) -> cls_meta.
- `BAMEnsemble`: after the decoder; gram_merge adjusts the meta probabilities with the scene difference,
  cls_merge fuses the meta background with the base learner's "any base class" map (the episode's own class
  excluded in training); logits = [merged background, meta foreground].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.errors import ConfigError
from fsseg.models.layers import classifier, conv3x3_relu
from fsseg.models.ops import resize, scene_difference

__all__ = [
    "ASPP",
    "BAMEnsemble",
    "BAMMetaDecoder",
    "BaseLearner",
    "BaseLearnerFeatures",
    "FrozenSubModel",
    "GramShotWeighting",
    "PyramidPooling",
]


# ----------------------------------------------------------------------------------------------------------
# Base learner (PSPNet head)
# ----------------------------------------------------------------------------------------------------------
class PyramidPooling(nn.Module):
    """PSPNet's PPM: per bin, adaptive average pool -> 1x1 conv (in/len(bins)) -> BN -> ReLU, upsampled
    (bilinear, align_corners=True) and concatenated after the input: (B, C, h, w) -> (B, 2C, h, w)."""

    def __init__(self, in_dim: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if in_dim % len(bins):
            raise ConfigError(f"PyramidPooling: in_dim {in_dim} is not divisible by the {len(bins)} bins {list(bins)}")
        red = in_dim // len(bins)
        self.bins = tuple(int(b) for b in bins)
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_dim, red, 1, bias=False), nn.BatchNorm2d(red), nn.ReLU(inplace=True)
            )
            for b in self.bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features], 1)


class BaseLearner(nn.Module):
    """BAM's base learner head: PPM + classifier over 1 + ``num_base_classes`` channels (0 = background).

    Args:
        in_dim: channels of the encoder tap it reads (ResNet layer4: 2048; efficientnet-lite0 index 4: 320).
        num_base_classes: base classes of the fold (PASCAL 15, COCO 60).
        base_class_ids: dataset class ids of the base classes in channel order (channel i + 1 = ids[i]);
            stored with the weights so a stage-2 run can check it was trained for its fold.
        bins, hidden, dropout: PSPNet's (1, 2, 3, 6), 512, 0.1.
    """

    def __init__(
        self,
        in_dim: int,
        num_base_classes: int,
        base_class_ids: Sequence[int] = (),
        bins: Sequence[int] = (1, 2, 3, 6),
        hidden: int = 512,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_base_classes < 1:
            raise ConfigError(f"BaseLearner: num_base_classes must be >= 1, got {num_base_classes}")
        if base_class_ids and len(base_class_ids) != num_base_classes:
            raise ConfigError(
                f"BaseLearner: {len(base_class_ids)} base_class_ids for {num_base_classes} base classes"
            )
        self.in_dim, self.num_base_classes = int(in_dim), int(num_base_classes)
        self.ppm = PyramidPooling(in_dim, bins)
        self.cls = nn.Sequential(
            nn.Conv2d(2 * in_dim, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, 1 + num_base_classes, 1),
        )
        ids = torch.tensor(list(base_class_ids) or [0] * num_base_classes, dtype=torch.long)
        self.register_buffer("base_class_ids", ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.ppm(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """PSPNet's ``cls[0:2](ppm(x))``: the 512-d conv3x3 + BN feature before the ReLU ("feature 5", which
        HDMNet's and AENet's priors read)."""
        return self.cls[1](self.cls[0](self.ppm(x)))

    def classify(self, feature: torch.Tensor) -> torch.Tensor:
        """The rest of the classifier on `features` (a non-inplace ReLU: the feature stays usable)."""
        return self.cls[4](self.cls[3](F.relu(feature)))

    def base_index_label(self, label: torch.Tensor) -> torch.Tensor:
        """Dataset class ids -> base-learner channels: base class -> its index + 1, everything else 0, 255 kept."""
        lut = torch.zeros(256, dtype=torch.long, device=label.device)
        lut[self.base_class_ids] = torch.arange(1, self.num_base_classes + 1, device=label.device)
        lut[255] = 255
        return lut[label.long().clamp(0, 255)]


class FrozenSubModel(nn.Module):
    """A sub-model with its own weights, used but never trained: no parameter requires grad (so it is out of
    the optimizer and of the trainable-parameter count), it stays in eval mode whatever ``train()`` Lightning
    calls, and its forward runs without autograd. With ``train_dropout`` its Dropout layers (only they) follow
    the host's mode: BAM's code calls ``model.train()`` and freezes only BatchNorm (``fix_bn``), so the frozen
    base learner's Dropout2d(0.1) stays active in stage-2 training."""

    def __init__(self, module: nn.Module, train_dropout: bool = False) -> None:
        super().__init__()
        self.module = module.requires_grad_(False).eval()
        self.train_dropout = bool(train_dropout)

    def train(self, mode: bool = True) -> FrozenSubModel:
        super().train(mode)
        self.module.eval()
        if mode and self.train_dropout:
            for m in self.module.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.train()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)


class BaseLearnerFeatures(nn.Module):
    """The frozen base learner's feature 5 (`BaseLearner.features`) of the query and the supports, read from
    encoder tap ``tap``, and the query's base logits: for heads whose prior reads feature 5 (HDMNet, SCCAN-Plus).
    The head then provides ``base_logits`` and the `BAMEnsemble` (built without a learner) uses them."""

    def __init__(self, base_learner: nn.Module, tap: str = "base", train_dropout: bool = False) -> None:
        super().__init__()
        self.learner = FrozenSubModel(base_learner, train_dropout)
        self.tap = tap

    def forward(
        self, query: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor], logits_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> query feature 5 (B, F, h, w), support feature 5 (B, K, F, h, w), query base logits (B, 1 + C, h, w),
        or with ``logits_size`` classified from feature 5 resized to that size (AENet's SCCANPlus)."""
        if self.tap not in query:
            raise ConfigError(f"the base learner reads encoder tap {self.tap!r}; the encoder has {sorted(query)}")
        b, k = support[self.tap].shape[:2]
        learner = self.learner.module
        with torch.no_grad():  # one pass over query and supports (frozen BN: batch-independent)
            feats = learner.features(torch.cat([query[self.tap], support[self.tap].flatten(0, 1)]))
            q, s = feats[:b], feats[b:].unflatten(0, (b, k))
            return q, s, learner.classify(q if logits_size is None else resize(q, logits_size))


# ----------------------------------------------------------------------------------------------------------
# K-shot re-weighting from the scene difference
# ----------------------------------------------------------------------------------------------------------
class GramShotWeighting(nn.Module):
    """Per-shot weights (B, K) and the weighted scene difference (B,) from the ``low_tap`` features.

    1-shot: weight 1. K > 1: the K differences sorted ascending pass ``kshot_rw`` (1x1 convs K -> hidden -> K, or
    one K -> K conv initialised 1/K when hidden = 0); softmax over shots. ``gather`` maps the sorted weights back
    to the shots: ``bam`` un-sorts them (BAM's ``weight.gather(1, idx2)``); ``hdmnet`` reproduces HDMNet's
    ``idx1.gather(1, idx2)``, which is the identity permutation, so the weights stay in sorted order.
    """

    def __init__(self, shots: int, hidden: int = 2, low_tap: str = "low", gather: str = "bam") -> None:
        super().__init__()
        if shots < 1:
            raise ConfigError(f"GramShotWeighting: shots must be >= 1, got {shots}")
        if gather not in ("bam", "hdmnet"):
            raise ConfigError(f"GramShotWeighting.gather must be 'bam' or 'hdmnet', got {gather!r}")
        self.shots, self.low_tap, self.gather = int(shots), low_tap, gather
        self.kshot_rw: nn.Module | None = None
        if shots > 1:
            if hidden > 0:
                self.kshot_rw = nn.Sequential(nn.Conv2d(shots, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, shots, 1))
            else:
                self.kshot_rw = nn.Conv2d(shots, shots, 1, bias=False)
                nn.init.constant_(self.kshot_rw.weight, 1.0 / shots)

    def forward(
        self, query: Mapping[str, torch.Tensor], support: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low_tap not in query:
            raise ConfigError(f"GramShotWeighting reads encoder tap {self.low_tap!r}; the encoder has {sorted(query)}")
        est = scene_difference(query[self.low_tap], support[self.low_tap])  # B, K
        k = est.shape[1]
        if k == 1 or self.kshot_rw is None:
            # one shot, or a 1-shot model evaluated with K shots (no re-weighting learnt): plain average
            weights = est.new_full(est.shape, 1.0 / k)
        else:
            if k != self.shots:
                raise ConfigError(f"GramShotWeighting was built for {self.shots} shots, the episode has {k}")
            sorted_est, order = est.sort(dim=1)
            rank = order.argsort(dim=1)  # = BAM's idx2 (position of every shot in the sorted order)
            w = self.kshot_rw(sorted_est[:, :, None, None])[:, :, 0, 0]
            idx = rank if self.gather == "bam" else order.gather(1, rank)
            weights = torch.softmax(w.gather(1, idx), dim=1)
        return weights, (weights * est).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# Meta learner
# ----------------------------------------------------------------------------------------------------------
class ASPP(nn.Module):
    """BAM's ASPP: image pooling + 1x1 + one dilated 3x3 per dilation (three), all with bias and ReLU,
    concatenated ((2 + len(dilations)) x dim).

    Kaiming-normal initialisation as the reference. ``dilations`` (6, 12, 18) at 60x60 features; the embedded
    recipe scales them to its 16x16 features."""

    def __init__(self, dim: int = 256, dilations: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(dim, dim, 1), nn.ReLU())]
            + [nn.Sequential(nn.Conv2d(dim, dim, 3, padding=int(d), dilation=int(d)), nn.ReLU()) for d in dilations]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return torch.cat([g] + [b(x) for b in self.branches], dim=1)


class BAMMetaDecoder(nn.Module):
    """BAM's meta learner after the guidance: cat(query_feat, prototype tiled, prior) -> 1x1 -> ASPP -> 1x1
    (5 x dim -> dim) -> two 3x3 (residual) -> cls_meta (3x3 + ReLU + Dropout2d 0.1 + 1x1 -> 2).

    Reads guidance ``query_feat``, ``prototype``, ``prior``; returns ``logits`` (the meta output; the
    ensemble, when configured, renames it ``meta_logits``).
    """

    requires = ("query_feat", "prototype", "prior")
    provides = ("logits",)

    def __init__(self, dim: int = 256, num_classes: int = 2, dilations: Sequence[int] = (6, 12, 18), dropout: float = 0.1):
        super().__init__()
        self.init_merge = nn.Sequential(nn.Conv2d(2 * dim + 1, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.aspp = ASPP(dim, dilations)
        self.res1 = nn.Sequential(nn.Conv2d((2 + len(dilations)) * dim, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.res2 = nn.Sequential(*conv3x3_relu(dim), *conv3x3_relu(dim))
        self.cls = classifier(dim, num_classes, dropout)

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = guidance["query_feat"]
        proto = guidance["prototype"].expand(-1, -1, *q.shape[-2:])
        x = self.init_merge(torch.cat([q, proto, guidance["prior"]], dim=1))
        x = self.res1(self.aspp(x))
        x = self.res2(x) + x
        return {"logits": self.cls(x)}


# ----------------------------------------------------------------------------------------------------------
# Ensemble
# ----------------------------------------------------------------------------------------------------------
def _merge_conv() -> nn.Conv2d:
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).view_as(conv.weight))  # initialised to pass channel 0 through
    return conv


class BAMEnsemble(nn.Module):
    """BAM's learner ensemble, run after the decoder (see the module docstring).

    Args:
        base_learner: the stage-1 `BaseLearner` (wrapped frozen here), or None to build the ensemble's
            trainable part alone (tests, parameter counts).
        base_tap: encoder tap the base learner reads (the deepest feature: ResNet layer4).
        exclude_episode_class: in training, leave the episode's class out of the base map (the reference; its
            class is a base class then and the base learner would call the target "base").
        base_resize: where the base learner's output meets the meta grid when their sizes differ: ``logits`` =
            resize the base logits, then the softmax (BAM, HDMNet and SCCAN-Plus, whose grids agree or whose
            reference classifies resized features) | ``map`` = the softmax and base map at the base learner's size,
            then resize the map (I2R's code: 15 x 15 vs 30 x 30 with its non-dilated encoder).
        base_dropout: the frozen base learner's Dropout active in training (BAM's code: ``fix_bn`` freezes only
            BatchNorm); False: the whole learner in eval mode (the paper's "frozen").

    Outputs: ``logits`` = [merged background, meta foreground] (softmax probabilities passed through two 1x1
    convs: what the reference feeds CrossEntropy as logits, see `fsseg.models.losses.EnsembleNLL` for the
    other reading), ``meta_logits`` (the decoder's), ``base_logits`` (the base learner's).
    """

    def __init__(
        self,
        base_learner: nn.Module | None,
        base_tap: str = "base",
        exclude_episode_class: bool = True,
        base_resize: str = "logits",
        base_dropout: bool = False,
    ) -> None:
        super().__init__()
        if base_resize not in ("logits", "map"):
            raise ConfigError(f"ensemble.base_resize must be 'logits' or 'map'; got {base_resize!r}")
        self.base_resize = base_resize
        self.base_learner = None if base_learner is None else FrozenSubModel(base_learner, base_dropout)
        self.base_tap = base_tap
        self.exclude_episode_class = bool(exclude_episode_class)
        self.gram_merge = _merge_conv()
        self.cls_merge = _merge_conv()

    def forward(self, out: Mapping[str, Any], context: Any) -> dict[str, torch.Tensor]:
        meta = out["logits"]
        extra = {}
        if self.base_learner is not None:
            taps = out["query_taps"]
            if self.base_tap not in taps:
                raise ConfigError(f"BAMEnsemble reads encoder tap {self.base_tap!r}; the encoder has {sorted(taps)}")
            base = self.base_learner(taps[self.base_tap])
            extra["base_logits"] = resize(base, meta.shape[-2:])
        elif "base_logits" in out:  # computed by an earlier part (a head reading the base learner's feature 5)
            base = out["base_logits"]
        else:
            raise ConfigError("BAMEnsemble has no base learner: give model.ensemble.base_learner")
        if self.base_resize == "logits":
            base = resize(base, meta.shape[-2:])
        return {"meta_logits": meta, **extra, "logits": self.combine(meta, base, out["scene_difference"], context)}

    def combine(
        self, meta: torch.Tensor, base: torch.Tensor, scene_difference: torch.Tensor, context: Any
    ) -> torch.Tensor:
        """The merged output; a base of another size than meta gives its base map at its own size first, then
        resized (bilinear, align_corners) to meta's grid (``base_resize: map``)."""
        meta_p, base_p = meta.softmax(dim=1), base.softmax(dim=1)
        base_map = base_p[:, 1:].sum(dim=1, keepdim=True)  # P(any base class)
        if self.training and self.exclude_episode_class:  # minus the episode's own class (channel idx + 1)
            own = (context.class_idx + 1).view(-1, 1, 1, 1).expand(-1, 1, *base_p.shape[-2:])
            base_map = base_map - base_p.gather(1, own)
        base_map = resize(base_map, meta.shape[-2:])
        est = scene_difference.view(-1, 1, 1, 1).expand_as(meta_p[:, :1])
        bg = self.gram_merge(torch.cat([meta_p[:, :1], est], dim=1))
        fg = self.gram_merge(torch.cat([meta_p[:, 1:], est], dim=1))
        return torch.cat([self.cls_merge(torch.cat([bg, base_map], dim=1)), fg], dim=1)
