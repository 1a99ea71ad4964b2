"""Few-shot segmentation metrics: class-wise mIoU, FB-IoU, FP/FN rates, and seed aggregation.

Conventions (the same as the reference implementations, shared notes ``baselines.md`` section 8):

* Every episode is a binary problem: foreground (label 1) = the episode's target class, background (0).
  Pixels labelled ``ignore_index`` (255) are not scored at all: they count in no intersection, no union
  and not in the denominator of the FP/FN rates, whatever the prediction there.
* **mIoU** is class-wise: for every class, foreground intersections and unions are *summed over all
  episodes of that class*, the class IoU is ``sum(I) / sum(U)``, and mIoU is the mean of the class IoUs
  over the classes that appeared in at least one episode. This is not the mean of per-episode IoUs: a
  large-object episode weighs more than a small-object one of the same class.
* **FB-IoU**: background and foreground intersections/unions are summed over all episodes (all classes),
  giving one background IoU and one foreground IoU; FB-IoU is their average.
* **fp_rate / fn_rate**: false-positive (predicted 1, label 0) and false-negative (predicted 0, label 1)
  pixels as fractions of all scored (non-ignored) pixels, summed over all episodes.
* An IoU whose union is zero (the class or region is empty in both prediction and label over every
  scored episode) is taken as 0, as the references do (``I / (U + eps)``).
* All values are floats in [0, 1]; result tables multiply by 100.

All states are integer pixel/episode counts with ``dist_reduce_fx="sum"``, so DDP synchronisation is an
exact sum and the result on N ranks equals the single-process result bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric

__all__ = ["BaseClassFalsePositives", "FewShotIoU", "aggregate_seeds"]


class FewShotIoU(Metric):
    """Class-wise mIoU, FB-IoU and FP/FN rates over few-shot episodes.

    Args:
        num_classes: number of classes in the split's class list; ``class_idx`` indexes it.
        ignore_index: label value that is not scored (default 255). Must not be 0 or 1.
        validate_args: check shapes and label values on every ``update`` (default True). The value checks
            cost a device-to-host synchronisation per batch.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``dist_sync_fn``, ...).

    ``update(pred, target, class_idx)``:
        pred: ``(B, H, W)`` hard prediction with values in {0, 1} (bool, integer or float), or logits
            ``(B, 2, H, W)`` (channel 1 = foreground), reduced with argmax over the channel axis.
        target: ``(B, H, W)`` integer labels in {0, 1, ignore_index}.
        class_idx: ``(B,)`` integer index of each episode's class in ``[0, num_classes)``.

        If ``pred``'s spatial size differs from ``target``'s, logits are upsampled to the target size with
        bilinear interpolation (``align_corners=False``) *before* the argmax; hard predictions are resized
        with ``mode="nearest"`` (PyTorch's legacy nearest: source index ``floor(dst * in / out)``). This
        whole-tensor resize is correct only if ``pred`` covers exactly the extent of ``target``; with
        padded network inputs or labels padded to a batch-wide size (``QUERY_LABEL_ORI``), crop the
        content region and resize per image first.

    ``compute()`` returns a dict:
        ``miou`` (float), ``fbiou`` (float), ``fp_rate`` (float), ``fn_rate`` (float),
        ``class_iou`` (float64 tensor of ``num_classes`` values, NaN for classes never seen),
        ``episodes`` (int, number of episodes scored). With no episodes, the floats are NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    class_inter: torch.Tensor
    class_union: torch.Tensor
    class_episodes: torch.Tensor
    fb_inter: torch.Tensor
    fb_union: torch.Tensor
    fp_pixels: torch.Tensor
    fn_pixels: torch.Tensor
    scored_pixels: torch.Tensor
    episodes: torch.Tensor

    def __init__(self, num_classes: int, ignore_index: int = 255, validate_args: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"FewShotIoU: num_classes must be a positive int, got {num_classes!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or ignore_index in (0, 1):
            raise ValueError(
                f"FewShotIoU: ignore_index must be an int other than 0 and 1, got {ignore_index!r}"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.validate_args = validate_args

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64)

        # Foreground intersection / union / episode count per class.
        self.add_state("class_inter", default=zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("class_union", default=zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("class_episodes", default=zeros(num_classes), dist_reduce_fx="sum")
        # [background, foreground] intersection / union over all episodes.
        self.add_state("fb_inter", default=zeros(2), dist_reduce_fx="sum")
        self.add_state("fb_union", default=zeros(2), dist_reduce_fx="sum")
        self.add_state("fp_pixels", default=zeros(), dist_reduce_fx="sum")
        self.add_state("fn_pixels", default=zeros(), dist_reduce_fx="sum")
        self.add_state("scored_pixels", default=zeros(), dist_reduce_fx="sum")
        self.add_state("episodes", default=zeros(), dist_reduce_fx="sum")

    # ------------------------------------------------------------------ update
    def _hard_prediction(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Bring ``pred`` to a boolean foreground mask of ``target``'s shape."""
        size = tuple(target.shape[-2:])
        if pred.ndim == 4:
            if pred.shape[1] != 2:
                raise ValueError(
                    f"FewShotIoU: logits must have 2 channels (background, foreground), got shape "
                    f"{tuple(pred.shape)}"
                )
            if tuple(pred.shape[-2:]) != size:
                logits = pred if pred.is_floating_point() else pred.float()
                pred = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            return pred.argmax(dim=1) == 1
        if pred.ndim == 3:
            if self.validate_args:
                bad = (pred != 0) & (pred != 1)
                if bool(bad.any()):
                    raise ValueError(
                        f"FewShotIoU: hard predictions must be 0 or 1, got value {pred[bad][0].item()!r}"
                    )
            if tuple(pred.shape[-2:]) != size:
                pred = F.interpolate(pred[:, None].float(), size=size, mode="nearest")[:, 0]
            return pred != 0
        raise ValueError(
            f"FewShotIoU: pred must be (B, H, W) hard predictions or (B, 2, H, W) logits, got shape "
            f"{tuple(pred.shape)}"
        )

    def _check(self, pred: torch.Tensor, target: torch.Tensor, class_idx: torch.Tensor) -> None:
        if target.ndim != 3:
            raise ValueError(f"FewShotIoU: target must be (B, H, W), got shape {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"FewShotIoU: target must be an integer tensor, got dtype {target.dtype}")
        batch = target.shape[0]
        if pred.shape[0] != batch:
            raise ValueError(
                f"FewShotIoU: pred has batch size {pred.shape[0]} (shape {tuple(pred.shape)}) but target "
                f"has {batch} (shape {tuple(target.shape)})"
            )
        if class_idx.ndim != 1 or class_idx.shape[0] != batch:
            raise ValueError(
                f"FewShotIoU: class_idx must have shape ({batch},), got shape {tuple(class_idx.shape)}"
            )
        if class_idx.is_floating_point() or class_idx.is_complex() or class_idx.dtype == torch.bool:
            raise ValueError(f"FewShotIoU: class_idx must be an integer tensor, got dtype {class_idx.dtype}")
        if not self.validate_args or batch == 0:
            return
        out_of_range = (class_idx < 0) | (class_idx >= self.num_classes)
        if bool(out_of_range.any()):
            raise ValueError(
                f"FewShotIoU: class_idx {class_idx[out_of_range][0].item()} is out of range "
                f"[0, {self.num_classes})"
            )
        bad = (target != 0) & (target != 1) & (target != self.ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"FewShotIoU: target value {target[bad][0].item()} is not 0, 1 or the ignore index "
                f"{self.ignore_index}"
            )

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_idx: torch.Tensor) -> None:
        """Score a batch of episodes (see the class docstring for shapes)."""
        class_idx = torch.as_tensor(class_idx, device=target.device)
        self._check(pred, target, class_idx)
        fg_pred = self._hard_prediction(pred, target)
        scored = target != self.ignore_index
        fg_true = target == 1
        fg_pred = fg_pred & scored  # predictions on ignored pixels are not scored

        def per_episode(mask: torch.Tensor) -> torch.Tensor:
            return mask.flatten(1).sum(dim=1, dtype=torch.int64)

        tp = per_episode(fg_pred & fg_true)
        fp = per_episode(fg_pred & ~fg_true)  # fg_pred is already restricted to scored pixels
        fn = per_episode(~fg_pred & fg_true)
        n_scored = per_episode(scored)
        tn = n_scored - tp - fp - fn
        union_fg = tp + fp + fn
        union_bg = tn + fp + fn

        idx = class_idx.to(torch.int64)
        self.class_inter.scatter_add_(0, idx, tp)
        self.class_union.scatter_add_(0, idx, union_fg)
        self.class_episodes.scatter_add_(0, idx, torch.ones_like(idx))
        self.fb_inter += torch.stack([tn.sum(), tp.sum()])
        self.fb_union += torch.stack([union_bg.sum(), union_fg.sum()])
        self.fp_pixels += fp.sum()
        self.fn_pixels += fn.sum()
        self.scored_pixels += n_scored.sum()
        self.episodes += idx.numel()

    # ----------------------------------------------------------------- compute
    def _wrap_compute(self, compute: Any) -> Any:
        # torchmetrics squeezes one-element tensors in compute()'s output: keep class_iou 1-D when
        # num_classes == 1, and hand out a copy of the (cached) dict so callers cannot alter the cache.
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(wrapped)
        def compute_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
            out = dict(wrapped(*args, **kwargs))
            out["class_iou"] = out["class_iou"].reshape(-1)
            return out

        return compute_dict

    def compute(self) -> dict[str, Any]:
        """Return miou, fbiou, fp_rate, fn_rate (floats in [0, 1]), class_iou and episodes."""
        inter = self.class_inter.double()
        union = self.class_union.double()
        seen = self.class_episodes > 0
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
        class_iou = torch.where(seen, iou, torch.full_like(iou, float("nan")))
        miou = float(class_iou[seen].mean()) if bool(seen.any()) else math.nan

        episodes = int(self.episodes)
        if episodes:
            fb_u = self.fb_union.double()
            fb_iou = torch.where(fb_u > 0, self.fb_inter.double() / fb_u.clamp(min=1), torch.zeros_like(fb_u))
            fbiou = float(fb_iou.mean())
        else:
            fbiou = math.nan
        n_scored = int(self.scored_pixels)
        fp_rate = int(self.fp_pixels) / n_scored if n_scored else math.nan
        fn_rate = int(self.fn_pixels) / n_scored if n_scored else math.nan
        return {
            "miou": miou,
            "fbiou": fbiou,
            "fp_rate": fp_rate,
            "fn_rate": fn_rate,
            "class_iou": class_iou.cpu(),
            "episodes": episodes,
        }


# ---------------------------------------------------------------------- seeds
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (3 decimals), used without scipy.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959963984540054


def _t975(df: int, prefer_scipy: bool = True) -> float:
    """Two-sided 95% t quantile: scipy when installed, else the table (df <= 30) and beyond it the
    Cornish-Fisher expansion around the normal quantile (error < 1e-4 for df > 30; 1.96 in the limit)."""
    if df < 1:
        return math.nan
    if prefer_scipy:
        try:
            from scipy.stats import t as student_t
        except ImportError:
            pass
        else:
            return float(student_t.ppf(0.975, df))
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def aggregate_seeds(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample std (ddof=1) and 95% CI half-width of a metric over seeds.

    ``ci95 = t_{0.975, n-1} * std / sqrt(n)`` (Student t; quantile from scipy when installed, otherwise a
    built-in table). With one value, ``std`` is 0.0 and ``ci95`` is NaN (no interval can be estimated).
    Returns ``{"mean", "std", "ci95", "n"}``. Raises ValueError for an empty sequence.
    """
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("aggregate_seeds: got no values")
    mean = math.fsum(vals) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": math.nan, "n": 1}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    return {"mean": mean, "std": std, "ci95": _t975(n - 1) * std / math.sqrt(n), "n": n}


class BaseClassFalsePositives(Metric):
    """Share of base-class pixels predicted foreground in novel-class episodes (BAM's claim: the ensemble
    suppresses them). ``update(pred, base_label)``: pred (B, 2, H, W) logits or (B, H, W) {0, 1}; base_label
    (B, H, W) at the same size, > 0 on base-class pixels, 255 ignored. Episodes whose query holds no base pixel
    add nothing. Summed integer counts: exact under DDP."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = 255, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("base_fg", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("base_pixels", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, base_label: torch.Tensor) -> None:
        fg = pred.argmax(dim=1) == 1 if pred.ndim == 4 else pred != 0
        base = (base_label > 0) & (base_label != self.ignore_index)
        self.base_fg += (fg & base).sum()
        self.base_pixels += base.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """``rate`` (NaN when no base pixel was scored) and the ``pixels`` it is over."""
        rate = self.base_fg.double() / self.base_pixels.double() if self.base_pixels > 0 else torch.tensor(float("nan"))
        return {"rate": rate, "pixels": self.base_pixels}
