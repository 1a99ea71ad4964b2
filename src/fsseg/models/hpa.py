"""HPA (Lang et al., "Few-shot segmentation via holistic prototype activation"; chunbolang/HPA model/HPA.py):
prior prototypes of every base class, activated on the query by a learnable relation coding (the Prototype
Activation Module, PAM), and a Cross-Referenced Decoder (CRD). One of PAHNet's prototype predictors.

Reference facts (round2-references.md §1.6; model/HPA.py, model/atten.py, model/ASPP.py):
- Query/support features: reduced cat(layer3, layer2) (1x1 -> 256, ReLU, Dropout2d 0.5, separate convs); the
  support prototype = masked average (area + 5e-4), averaged over shots; PFENet's max-cosine prior on layer4.
- Base-class prototypes (``initmodel/prototypes/{dataset}/{arch}/stage{2,3}.pth``, 512-d and 1024-d per class,
  computed by an unpublished procedure): reduced by their own 1x1 conv (``down_pros``). fsseg DEFINES the bank
  (`base_prototype_bank`, docs/notes.md "PAHNet predictors").
- PAM (``Learnable`` mode): a_p(x) = sigmoid(W2 relu(W1 [q(x); p] + b1) + b2) per prototype p (2D -> 8 -> 1).
  Training (base-class episodes): FG candidates = {support prototype, the episode class's bank prototype}, BG
  candidates = the other base prototypes; evaluation: FG = {support prototype}, BG = every base prototype.
  Per pixel: the max FG activation and its prototype, the max BG activation and its prototype; where BG wins,
  the activation map is 0 and the pixel takes the BG prototype ("erasing"), else the FG one.
- Merge cat(query, activated prototypes, prior, activation map) -> 1x1 -> ASPP (1x1 pool, 1x1, 3x3 dilated
  6/12/18) -> 1x1 (5 dim -> dim).
- CRD: ``Feature_Reweighting`` channel attention between the support's and the query's raw low-level feature
  (shot average), out = softmax-weighted (self + alpha * cross) / (1 + alpha) @ query + query, alpha learnable
  from 0; then DeepLab-style low-level fusion (1x1 -> 48, cat, 3x3 -> dim), two 3x3 (residual), cls -> 2.
- Loss: CE(logits) + aux on the activation map: CE on [1 - a, a] ("BCE") or MSE against the query mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX, QUERY_MASK
from fsseg.errors import ConfigError
from fsseg.models.bam import ASPP
from fsseg.models.layers import classifier, conv3x3_relu
from fsseg.models.losses import AuxLoss, CrossEntropy
from fsseg.models.ops import mask_to_feature, masked_average_pool, max_cosine_prior, resize

log = logging.getLogger(__name__)
BANK_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# The base-class prototype bank (fsseg's definition; HPA ships files made by an unpublished procedure)
# ----------------------------------------------------------------------------------------------------------
def _encoder_digest(encoder: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def bank_key(source: Any, fold: int, encoder: nn.Module, tap: str, size: int, max_images: int | None) -> dict:
    """What a bank depends on: dataset (root name and reader), fold, encoder (name, taps and the digest of its
    weights), tap, image size, image count."""
    return {
        "format": BANK_FORMAT, "dataset": Path(str(source.root)).name, "reader": type(source).__name__,
        "fold": int(fold), "encoder": getattr(encoder, "name", type(encoder).__name__),
        "taps": {k: list(v) for k, v in getattr(encoder, "taps", {}).items()}, "tap": tap, "size": int(size),
        "max_images": max_images, "weights": _encoder_digest(encoder),
    }  # fmt: skip


@torch.no_grad()
def base_prototype_bank(
    source: Any,
    fold: int,
    encoder: nn.Module,
    tap: str = "mid",
    size: int = 473,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    max_images: int | None = None,
    eps: float = 5e-4,
) -> torch.Tensor:
    """(n_base, C) prototypes of the fold's base classes, in the fold's base-class order.

    Definition (fsseg's; HPA's files are unpublished): for base class c, the mean over the fold's training
    images containing c of the image's masked-average feature of tap ``tap`` over the pixels labelled c (label
    resized bilinearly to the feature size, as support masks are; area + eps), images resized and padded to
    ``size`` as at evaluation (no augmentation), the frozen encoder in eval mode. Images are those of the
    source's ``train`` split in list order (the first ``max_images`` when set). A class no image shows keeps a
    zero prototype (logged). Cached under ``cache_dir/hpa_prototypes/<key>.pt`` (`bank_key`)."""
    from fsseg.data.transforms import EvalTransform
    from fsseg.models.base_learner import base_index_lut

    key = bank_key(source, fold, encoder, tap, size, max_images)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "hpa_prototypes" / f"{digest}.pt" if cache_dir else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("key") == key:
            return blob["bank"]
    base_ids = [int(c) for c in source.fold_classes(fold)[0]]
    lut = torch.as_tensor(base_index_lut(base_ids).astype("int64"))
    tf = EvalTransform(size, encoder.mean, encoder.std)
    n = len(source.items("train")) if max_images is None else min(int(max_images), len(source.items("train")))
    was_training = encoder.training
    encoder.eval()
    device = next(iter(encoder.parameters()), torch.zeros(())).device
    sums = torch.zeros(len(base_ids), encoder.tap_channels[tap], dtype=torch.float64)
    counts = torch.zeros(len(base_ids), dtype=torch.float64)
    for start in range(0, n, batch_size):
        images, labels = [], []
        for i in range(start, min(n, start + batch_size)):
            img, label = source.load("train", i)
            image, (lab,), _ = tf(img, [lut[torch.as_tensor(label.astype("int64")).clamp(0, 255)].numpy()])
            images.append(torch.as_tensor(image))
            labels.append(torch.as_tensor(lab).long())
        feat = encoder(torch.stack(images).to(device))[tap].float()  # N, C, h, w
        lab = torch.stack(labels).to(device)  # N, H, W: base index 1..n, 0 other, 255 padding
        onehot = (lab[:, None] == torch.arange(1, len(base_ids) + 1, device=device)[None, :, None, None]).float()
        m = mask_to_feature(onehot, feat.shape[-2:])  # N, n, 1, h, w
        area = m.sum(dim=(2, 3, 4))  # N, n
        protos = torch.einsum("nchw,nkhw->nkc", feat, m[:, :, 0]) / (area[..., None] + eps)
        present = (area > 0).double()
        sums += (protos.double() * present[..., None]).sum(0).cpu()
        counts += present.sum(0).cpu()
    encoder.train(was_training)
    if (counts == 0).any():
        log.warning("HPA prototype bank: base classes %s appear in none of the %d images", 
                    [base_ids[i] for i in torch.nonzero(counts == 0).flatten().tolist()], n)  # fmt: skip
    bank = (sums / counts.clamp(min=1)[:, None]).float()
    if path is not None:
        import io

        from fsseg.io import write_atomic

        buf = io.BytesIO()
        torch.save({"key": key, "bank": bank}, buf)
        write_atomic(path, buf.getvalue())
    return bank


# ----------------------------------------------------------------------------------------------------------
# Prototype Activation Module (head) and Cross-Referenced Decoder
# ----------------------------------------------------------------------------------------------------------
def _reduction(in_ch: int, out_ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(dropout))


class PrototypeActivation(nn.Module):
    """HPA's learnable relation coding a_p(x) = sigmoid(W2 relu(W1 [q(x); p] + b1) + b2), for every candidate
    prototype at once (W1 split into its query and prototype halves): query (B, D, h, w), prototypes (B, N, D)
    -> (B, N, h, w)."""

    def __init__(self, dim: int, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Conv2d(2 * dim, hidden, 1)
        self.out = nn.Conv2d(hidden, 1, 1)
        self.dim = dim

    def forward(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        w1 = self.hidden.weight[:, :, 0, 0]  # hidden, 2D
        q = torch.einsum("od,bdhw->bohw", w1[:, : self.dim], query)  # B, hidden, h, w
        p = torch.einsum("od,bnd->bno", w1[:, self.dim :], prototypes) + self.hidden.bias  # B, N, hidden
        h = F.relu(q[:, None] + p[..., None, None])  # B, N, hidden, h, w
        a = torch.einsum("o,bnohw->bnhw", self.out.weight[0, :, 0, 0], h) + self.out.bias
        return a.sigmoid()


class HPAHead(nn.Module):
    """HPA's guidance: reduced query feature, support prototype, prior, and the PAM's activation map
    (``activation_map`` (B, 1, h, w)) with the per-pixel activated prototypes (``activated_prototypes``
    (B, D, h, w)); the raw low-level taps for the CRD (``query_low``, ``support_low``: shot average).

    The base-class bank (``bank`` buffer, (n_base, C_mid)) is computed at the first forward by
    `base_prototype_bank` from ``bank_source`` (the run's data source) with the run's encoder, unless a
    checkpoint brought it (it is saved with the weights: a trained run never recomputes it)."""

    provides = ("query_feat", "prototype", "prior", "activation_map", "activated_prototypes", "query_low", "support_low")

    def __init__(
        self,
        tap_channels: Mapping[str, int],
        encoder: nn.Module | None = None,
        bank_source: Any = None,
        fold: int = 0,
        num_base: int | None = None,
        bank_size: int = 473,
        bank_cache: str | None = None,
        bank_max_images: int | None = None,
        reduce_dim: int = 256,
        dropout: float = 0.5,
        relation_dim: int = 8,
    ) -> None:
        super().__init__()
        missing = sorted({"mid", "high", "low"} - set(tap_channels))
        if missing:
            raise ConfigError(f"HPAHead needs encoder taps 'mid', 'high' and 'low'; missing {missing}")
        if num_base is None:
            if bank_source is None:
                raise ConfigError("HPAHead needs head.bank_source (the data source) or head.num_base")
            num_base = len(bank_source.fold_classes(int(fold))[0])
        if num_base < 2:
            raise ConfigError(f"head.num_base must be >= 2 (the fold's base classes); got {num_base}")
        mid = tap_channels["mid"]
        self.down_query = _reduction(mid, reduce_dim, dropout)
        self.down_support = _reduction(mid, reduce_dim, dropout)
        self.down_prototypes = _reduction(mid, reduce_dim, dropout)
        self.activation = PrototypeActivation(reduce_dim, relation_dim)
        self.register_buffer("bank", torch.zeros(num_base, mid))
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.bool))
        self._bank_args = {"source": bank_source, "fold": fold, "size": bank_size, "cache_dir": bank_cache,
                           "max_images": bank_max_images}  # fmt: skip
        self._encoder = [encoder]  # not a submodule: the segmenter owns it

    def ensure_bank(self) -> None:
        if bool(self.bank_ready):
            return
        encoder, args = self._encoder[0], self._bank_args
        if encoder is None or args["source"] is None:
            raise ConfigError("HPAHead has no prototype bank: give it bank_source (the data source) and the encoder")
        bank = base_prototype_bank(args["source"], args["fold"], encoder, "mid", args["size"], args["cache_dir"],
                                   max_images=args["max_images"])  # fmt: skip
        if bank.shape != self.bank.shape:
            raise ConfigError(f"HPA bank has shape {tuple(bank.shape)}; head.num_base and the mid tap expect {tuple(self.bank.shape)}")
        self.bank.copy_(bank.to(self.bank.device))
        self.bank_ready.fill_(True)

    def forward(self, query, support, support_mask, context=None) -> dict[str, torch.Tensor]:
        self.ensure_bank()
        b, k = support["mid"].shape[:2]
        q = self.down_query(query["mid"])
        s = self.down_support(support["mid"].flatten(0, 1))
        size = q.shape[-2:]
        m = mask_to_feature(support_mask, size)
        proto = masked_average_pool(s, m.flatten(0, 1)).view(b, k, -1).mean(dim=1)  # B, D
        mh = mask_to_feature(support_mask, query["high"].shape[-2:])
        prior = resize(max_cosine_prior(query["high"], support["high"], mh), size)
        bank = self.down_prototypes(self.bank[..., None, None])[..., 0, 0]  # n, D
        n = bank.shape[0]
        bank = bank[None].expand(b, -1, -1)
        if self.training and context is not None and context.class_idx is not None:
            # training on base classes: the episode's class joins the FG candidates, the others are BG
            idx = context.class_idx.long().view(b)
            fg = torch.cat([proto[:, None], bank[torch.arange(b), idx][:, None]], dim=1)  # B, 2, D
            others = torch.arange(n, device=idx.device)[None].expand(b, -1)
            keep = others != idx[:, None]
            bg = bank[keep].view(b, n - 1, -1)
        else:
            fg, bg = proto[:, None], bank
        a_fg, a_bg = self.activation(q, fg), self.activation(q, bg)  # B, Nf/Nb, h, w
        fg_val, fg_idx = a_fg.max(dim=1)
        bg_val, bg_idx = a_bg.max(dim=1)
        bg_wins = bg_val > fg_val
        act = torch.where(bg_wins, torch.zeros_like(fg_val), fg_val)[:, None]  # erasing
        pick_fg = torch.gather(fg, 1, fg_idx.flatten(1)[..., None].expand(-1, -1, fg.shape[-1]))  # B, hw, D
        pick_bg = torch.gather(bg, 1, bg_idx.flatten(1)[..., None].expand(-1, -1, bg.shape[-1]))
        chosen = torch.where(bg_wins.flatten(1)[..., None], pick_bg, pick_fg).transpose(1, 2).reshape(q.shape)
        return {
            "query_feat": q, "prototype": proto[..., None, None], "prior": prior, "activation_map": act,
            "activated_prototypes": chosen, "query_low": query["low"], "support_low": support["low"].mean(dim=1),
        }  # fmt: skip


class FeatureReweighting(nn.Module):
    """HPA's cross-referenced channel attention (``Feature_Reweighting``): channel affinities of the query with
    itself and of the support with the query, each turned into max - value before a softmax over channels,
    mixed as (self + alpha * cross) / (1 + alpha) (alpha learnable, from 0), applied to the query, plus the
    query. support, query (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        b, c, h, w = query.shape
        qf, sf = query.flatten(2), resize(support, (h, w)).flatten(2)
        cross = torch.bmm(sf, qf.transpose(1, 2))  # B, C, C
        self_ = torch.bmm(qf, qf.transpose(1, 2))
        cross = (cross.max(dim=-1, keepdim=True).values - cross).softmax(dim=-1)
        self_ = (self_.max(dim=-1, keepdim=True).values - self_).softmax(dim=-1)
        att = (self_ + self.alpha * cross) / (1 + self.alpha)
        return torch.bmm(att, qf).view(b, c, h, w) + query


class CrossReferencedDecoder(nn.Module):
    """HPA after the PAM: merge -> ASPP -> 1x1, then the CRD (reweighted low-level query feature fused DeepLab
    style), two 3x3 (residual) and the classifier. Returns ``logits`` (B, 2, h, w) at the low tap's size."""

    requires = ("query_feat", "activated_prototypes", "prior", "activation_map", "query_low", "support_low")

    def __init__(self, dim: int = 256, low_dim: int = 512, dilations: Sequence[int] = (6, 12, 18), low_out: int = 48) -> None:
        super().__init__()
        self.init_merge = nn.Sequential(nn.Conv2d(2 * dim + 2, dim, 1, bias=False), nn.ReLU(inplace=True))
        self.aspp = ASPP(dim, dilations)
        self.res1 = nn.Sequential(nn.Conv2d(dim * (2 + len(dilations)), dim, 1, bias=False), nn.ReLU(inplace=True))
        self.reweight = FeatureReweighting()
        self.low = nn.Sequential(nn.Conv2d(low_dim, low_out, 1, bias=False), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(dim + low_out, dim, 3, padding=1, bias=False), nn.ReLU())
        self.res2 = nn.Sequential(*conv3x3_relu(dim), *conv3x3_relu(dim))
        self.cls = classifier(dim, 2, 0.1)

    def forward(self, guidance: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = guidance["query_feat"]
        x = torch.cat([q, guidance["activated_prototypes"], resize(guidance["prior"], q.shape[-2:]),
                       guidance["activation_map"]], dim=1)  # fmt: skip
        x = self.res1(self.aspp(self.init_merge(x)))
        low = self.low(self.reweight(guidance["support_low"], guidance["query_low"]))
        x = self.fuse(torch.cat([resize(x, low.shape[-2:]), low], dim=1))
        x = self.res2(x) + x
        return {"logits": self.cls(x)}


class ActivationMapLoss(AuxLoss):
    """HPA's auxiliary loss on the PAM activation map (bilinear to the mask size): ``ce`` = CE on [1 - a, a]
    (the reference's "BCE" option: log-softmax of probabilities), ``mse`` = mean squared error over non-255
    pixels (the reference divides it by the batch size too: ``mse_per_batch``)."""

    def __init__(self, weight: float = 1.0, criterion: str = "ce", key: str = "activation_map") -> None:
        super().__init__(weight)
        if criterion not in ("ce", "mse", "mse_per_batch"):
            raise ConfigError(f"aux activation-map criterion must be 'ce', 'mse' or 'mse_per_batch'; got {criterion!r}")
        self.criterion, self.key = criterion, key
        self.ce = CrossEntropy()

    def forward(self, outputs, batch, model) -> dict[str, torch.Tensor]:
        target = batch[QUERY_MASK]
        a = F.interpolate(outputs[self.key], size=target.shape[-2:], mode="bilinear", align_corners=True)
        if self.criterion == "ce":
            return {"activation": self.ce(torch.cat([1 - a, a], dim=1), target)}
        valid = target != IGNORE_INDEX
        mse = ((a[:, 0] - target.float()) ** 2)[valid].mean() if valid.any() else a.sum() * 0
        return {"activation": mse / target.shape[0] if self.criterion == "mse_per_batch" else mse}


__all__ = [
    "ActivationMapLoss",
    "CrossReferencedDecoder",
    "FeatureReweighting",
    "HPAHead",
    "PrototypeActivation",
    "bank_key",
    "base_prototype_bank",
]  # fmt: skip
