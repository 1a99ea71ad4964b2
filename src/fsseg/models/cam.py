"""Class activation maps at an encoder tap, batched: I2R's PMGM (Fu et al., Sec. 3.2, Table 6).

The classifier is the encoder's kept ImageNet head (``FrozenEncoder(keep_head=True).tail``): the CAM layer's
features go through the rest of the network and the head, and ONE autograd call gives the gradients of the target
class score for the whole batch (rows are independent: the frozen network runs in eval mode). No parameter receives
``.grad``: the gradient is taken with respect to the detached tap only.

Each method maps the tap's activations A (N, C, h, w) and the gradients g = dy/dA to a map (N, h, w) >= 0
(round2-references.md §2.1, from the reference's ``CAM_Generator/attribution``):

- ``gradcam``   w_c = GAP(g_c);                            cam = ReLU(sum_c w_c A_c)
- ``xgradcam``  w_c = sum_xy(g_c A_c) / (sum_xy A_c + 1e-7); cam = ReLU(sum_c w_c A_c)      (I2R's default)
- ``gradcampp`` alpha = g^2 / (2 g^2 + sum_xy(A) g^3 + 1e-6), 0 where g = 0; w_c = sum_xy ReLU(g_c) alpha_c
  (the reference's 1e-6 matters: an ImageNet head's gradients at the CAM tap are ~1e-4, so g^2 ~ 1e-8 << 1e-6)
- ``hirescam``  cam = ReLU(sum_c g_c A_c)
- ``bagcam``    the target is the class *probability* (softmax); t = g A; cam = sum_c ReLU(GAP(t_c + 1) t_c)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from fsseg.errors import ConfigError

__all__ = ["CAM_METHODS", "adaptive_thresholds", "cam_from_gradients", "class_activation_maps", "normalise_cams"]

CAM_METHODS = ("xgradcam", "gradcam", "gradcampp", "hirescam", "bagcam")
GRADCAMPP_EPS = 1e-6  # the reference's (CAM_Generator/attribution/grad_cam_plusplus.py)
ADAPTIVE_STEPS = 50  # the reference's sweep t in {0, 0.02, ..., 1}


def check_cam_method(method: str) -> str:
    if method not in CAM_METHODS:
        raise ConfigError(f"head.cam_method must be one of {list(CAM_METHODS)}; got {method!r}")
    return method


def cam_from_gradients(method: str, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Activations and gradients (N, C, h, w) -> CAM (N, h, w), non-negative, before normalisation."""
    if method == "gradcam":
        return F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    if method == "xgradcam":
        w = (g * a).sum(dim=(2, 3), keepdim=True) / (a.sum(dim=(2, 3), keepdim=True) + 1e-7)
        return F.relu((w * a).sum(1))
    if method == "gradcampp":
        g2, g3 = g.pow(2), g.pow(3)
        den = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3 + GRADCAMPP_EPS
        alpha = torch.where(g != 0, g2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g))
        w = (F.relu(g) * alpha).sum(dim=(2, 3), keepdim=True)
        return F.relu((w * a).sum(1))
    if method == "hirescam":
        return F.relu((g * a).sum(1))
    if method == "bagcam":
        t = g * a
        return F.relu((t + 1).mean(dim=(2, 3), keepdim=True) * t).sum(1)
    raise ConfigError(f"unknown CAM method {method!r}; expected one of {list(CAM_METHODS)}")


def class_activation_maps(
    classify: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, classes: torch.Tensor, method: str
) -> torch.Tensor:
    """CAMs (N, h, w) of ``classes`` (N,) from the tap ``feats`` (N, C, h, w); ``classify(x)`` -> logits (N, K)
    is the network after the tap (the encoder's ``tail``). One forward and one backward for the batch."""
    with torch.enable_grad():
        x = feats.detach()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).requires_grad_(True)
        logits = classify(x)
        scores = logits.softmax(dim=1) if method == "bagcam" else logits
        target = scores.gather(1, classes.view(-1, 1).long()).sum()
        # backward into the tap only (``inputs``): no parameter's .grad is touched (the same as autograd.grad, which
        # FlopCounterMode's module hooks cannot follow)
        torch.autograd.backward(target, inputs=[x])
    return cam_from_gradients(method, x.detach(), x.grad)


def normalise_cams(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) in [0, 1]: bilinear upsampling (align_corners=False, as the reference) and min-max
    per map. A constant map (no activation) becomes all zeros, so its CAM+ region is empty at any threshold (the
    reference's normalisation yields NaN there, which thresholds to empty as well)."""
    up = F.interpolate(cams.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)
    flat = up.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(flat))
    return out.view_as(up)


def adaptive_thresholds(support_cams: torch.Tensor, support_masks: torch.Tensor, steps: int = ADAPTIVE_STEPS) -> torch.Tensor:
    """Per support map, the t in {0, 1/steps, ..., 1} maximising IoU(cam > t, mask) (I2R Fig. 5 "adaptive"; the
    first maximum on ties). support_cams (N, H, W) in [0, 1], support_masks (N, H, W) {0, 1} -> (N,)."""
    ts = torch.linspace(0, 1, steps + 1, device=support_cams.device, dtype=support_cams.dtype)
    above = support_cams.unsqueeze(1) > ts.view(1, -1, 1, 1)  # N, T, H, W
    m = support_masks.bool().unsqueeze(1)
    inter = (above & m).flatten(2).sum(2).float()
    union = (above | m).flatten(2).sum(2).float()
    iou = inter / (union + 1e-6)
    return ts[iou.argmax(dim=1)]
