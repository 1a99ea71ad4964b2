"""Image/mask transforms of the episodes (PFENet's pipeline, on albumentations).

Training (``TrainTransform``), in PFENet's order: random scale (one factor for both sides, range
``scale_range``), rotation by U(-rotate_deg, rotate_deg) with probability ``rotate_p`` (image padded with
the mean colour, masks with 255), Gaussian blur (5x5 kernel, sigma 1.1 as OpenCV's default, probability
``blur_p``), horizontal flip (``hflip_p``), then a random ``size`` x ``size`` crop; a smaller image is first
padded (centred) to the crop size, image with the mean, masks with 255. Finally the image is normalised:
``(x / 255 - mean) / std``.

Evaluation (``EvalTransform``): the longer side is resized to ``size``; each side is then rounded down to a
multiple of ``size_divisor`` (PFENet's ``test_Resize`` uses 8; 1 disables it); the image is padded
bottom/right to ``size`` x ``size`` with the mean colour (0 after normalisation), the masks with 255. The
returned ``content_size`` (h', w') is the resized image's size inside the padded square. The
original-resolution label is not touched here: the episode dataset keeps it separately.

Masks always use nearest-neighbour interpolation, and every mask passed in one call gets exactly the
spatial transform of the image (the query's binary mask and its base label move together).
Randomness comes from the ``rng`` (numpy Generator) passed to each call, so an episode's augmentation is a
function of the episode's seed, whatever process runs it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch

from fsseg.data.batch import IGNORE_INDEX
from fsseg.errors import ConfigError

# PFENet blurs with cv2.GaussianBlur(img, (5, 5), 0): sigma 0 means OpenCV's default for the kernel size,
# 0.3 * ((5 - 1) / 2 - 1) + 0.8 = 1.1 (albumentations needs it explicitly).
_SIGMA5 = 0.3 * ((5 - 1) * 0.5 - 1) + 0.8


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t, std_t = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise ConfigError(
            f"mean={list(mean_t)} / std={list(std_t)}: expected 3 values each (RGB, 0..1 scale)"
        )
    if any(s <= 0 for s in std_t):
        raise ConfigError(f"std={list(std_t)}: expected positive values")
    if any(not 0.0 <= m <= 1.0 for m in mean_t):
        raise ConfigError(
            f"mean={list(mean_t)}: expected values in 0..1 (mean/std are on the 0..1 pixel scale)"
        )
    return mean_t, std_t


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))


def mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))


class TrainTransform:
    """Random training augmentation (see the module docstring); call with an image and a list of masks."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: Sequence[float] = (0.9, 1.1),
        rotate_deg: float = 10.0,
        blur_p: float = 0.5,
        hflip_p: float = 0.5,
        rotate_p: float = 0.5,
    ) -> None:
        if int(size) <= 0:
            raise ConfigError(f"train_size={size!r}: expected a positive crop size")
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(f"scale_range={[lo, hi]}: expected 0 < low <= high")
        if float(rotate_deg) < 0:
            raise ConfigError(f"rotate_deg={rotate_deg!r}: expected >= 0")
        for name, p in (("blur_p", blur_p), ("hflip_p", hflip_p), ("rotate_p", rotate_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise ConfigError(f"{name}={p!r}: expected a probability in [0, 1]")
        self.size = int(size)
        self.mean, self.std = _check_norm(mean, std)
        fill = tuple(255.0 * m for m in self.mean)
        const = cv2.BORDER_CONSTANT
        nearest, linear = cv2.INTER_NEAREST, cv2.INTER_LINEAR
        self.pipeline = A.Compose(
            [
                A.RandomScale(
                    scale_limit=(lo - 1.0, hi - 1.0), interpolation=linear, mask_interpolation=nearest, p=1.0
                ),
                A.Rotate(
                    limit=(-float(rotate_deg), float(rotate_deg)), interpolation=linear,
                    mask_interpolation=nearest, border_mode=const, fill=fill, fill_mask=IGNORE_INDEX,
                    p=float(rotate_p),
                ),
                A.GaussianBlur(blur_limit=(5, 5), sigma_limit=(_SIGMA5, _SIGMA5), p=float(blur_p)),
                A.HorizontalFlip(p=float(hflip_p)),
                A.PadIfNeeded(min_height=self.size, min_width=self.size, position="center", border_mode=const,
                              fill=fill, fill_mask=IGNORE_INDEX),
                A.RandomCrop(height=self.size, width=self.size),
                A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
            ],
            mask_interpolation=nearest,
        )

    def __call__(
        self, image: np.ndarray, masks: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rng = rng if rng is not None else np.random.default_rng()
        py = random.Random(int(rng.integers(0, 2**63 - 1)))
        self.pipeline.set_random_state(rng, py)
        out = self.pipeline(image=image, masks=list(masks))
        return to_chw_tensor(out["image"]), [mask_tensor(m) for m in out["masks"]]


def eval_content_size(height: int, width: int, size: int, size_divisor: int = 8) -> tuple[int, int]:
    """(h', w') of an ``height`` x ``width`` image after the evaluation resize (longer side -> ``size``,
    sides rounded down to a multiple of ``size_divisor``, at least one step)."""
    if height >= width:
        new_h, new_w = size, int(width * size / height)
    else:
        new_h, new_w = int(height * size / width), size
    d = max(1, int(size_divisor))
    new_h, new_w = max(d, new_h // d * d), max(d, new_w // d * d)
    return new_h, new_w


class EvalTransform:
    """Deterministic evaluation resize + pad (see the module docstring)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], size_divisor: int = 8) -> None:
        if int(size) <= 0:
            raise ConfigError(f"eval_size={size!r}: expected a positive size")
        if int(size_divisor) < 1 or int(size_divisor) > int(size):
            raise ConfigError(f"eval_size_divisor={size_divisor!r}: expected 1..eval_size")
        self.size = int(size)
        self.size_divisor = int(size_divisor)
        self.mean, self.std = _check_norm(mean, std)
        self._normalize = A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0, p=1.0)

    def content_size(self, height: int, width: int) -> tuple[int, int]:
        return eval_content_size(height, width, self.size, self.size_divisor)

    def __call__(
        self, image: np.ndarray, masks: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, int]]:
        h, w = image.shape[:2]
        nh, nw = self.content_size(h, w)
        s = self.size
        img = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        canvas = np.empty((s, s, 3), np.uint8)
        canvas[:] = np.round(np.array(self.mean) * 255.0).astype(np.uint8)
        canvas[:nh, :nw] = img
        out_masks = []
        for m in masks:
            r = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_NEAREST)
            pad = np.full((s, s), IGNORE_INDEX, m.dtype)
            pad[:nh, :nw] = r
            out_masks.append(mask_tensor(pad))
        img_n = self._normalize(image=canvas)["image"]
        img_t = to_chw_tensor(img_n)
        img_t[:, nh:, :] = 0.0  # the padding is exactly the mean colour, i.e. 0 after normalisation
        img_t[:, :, nw:] = 0.0
        return img_t, out_masks, (nh, nw)
