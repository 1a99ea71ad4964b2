"""Procedural few-shot segmentation benchmark in the PASCAL VOC layout (``fsseg-synth``).

The benchmark is a small stand-in for PASCAL-5i that ships with the suite: every image is generated from
``(seed, split, index)`` alone, so the same seed gives byte-identical files on any worker count, and the
PASCAL-5i reader loads it unchanged (same folders, list format, 20 classes in 4 folds of 5).

It is meant to be a few-shot problem rather than a colour-matching toy:

* a class is a (shape, texture) pair; 6 shape families x 5 texture families give 30 pairs, 20 of them are
  classes, so every shape is shared by 3-4 classes and every texture by 4: neither gives a class away.
  Colour is weak on purpose: each class draws its main hue from two of 8 hue centres, every hue centre is
  shared by 4-6 classes, and the second colour of a texture is drawn from a class-free distribution;
* look-alike pairs: same shape with another texture (e.g. ``striped_star`` / ``checkered_star``), same
  texture with another shape (``dotted_cross`` / ``dotted_heart``), and several classes of the same
  shape inside one fold (fold 3 holds ``dotted_heart`` and ``blotched_heart``);
* intra-class variation: scale (80% of objects have the area of a disc 20-38% of the image side
  sqrt(H*W) across, 12% are smaller, 8% larger; thin shapes span more), rotation, anisotropic stretch,
  bending and a smooth radial deformation of the outline, hue/saturation/value jitter, texture period,
  phase and orientation jitter, lighting gradient, grain;
* 1-4 objects per image, placed with occlusion (every object keeps >= 55% of its area visible), objects of
  all classes - novel ones included - share images, as in PASCAL: about 19% of the training images that
  qualify for a fold's base classes also hold one of its novel classes (35-40% of the novel objects sit
  in such images; meta.json ``novel_in_train`` has the numbers per fold); thin occluders cut across objects;
* cluttered backgrounds: random crops, flips, hue rotations and tints of the photographs bundled with
  scikit-image, mixed with procedural textures (fractal noise, stripes, checkers, gradients), plus
  distractors labelled 0 (random polygons, scribbles, outlines, photo patches, and "hard negatives": the 10
  shape/texture pairs that are no class);
* a 255 band, 3 pixels wide and straddling the edge, along every object outline (between objects, objects
  and background, and objects and occluders), as in VOC ``SegmentationClassAug``; image borders get none.

Class table (fold i holds the novel classes 5i+1 .. 5i+5; hue centres in degrees)::

    id  name                fold  shape     texture   hues
     1  striped_disc          0   disc      stripes   0, 135
     2  checkered_triangle    0   triangle  checker   45, 270
     3  blotched_star         0   star      blotch    90, 180
     4  dotted_cross          0   cross     dots      135, 315
     5  shaded_crescent       0   crescent  shaded    180, 45
     6  dotted_disc           1   disc      dots      225, 90
     7  blotched_triangle     1   triangle  blotch    270, 0
     8  shaded_star           1   star      shaded    315, 225
     9  striped_heart         1   heart     stripes   0, 180
    10  checkered_crescent    1   crescent  checker   45, 135
    11  shaded_disc           2   disc      shaded    90, 315
    12  striped_star          2   star      stripes   135, 270
    13  blotched_cross        2   cross     blotch    180, 0
    14  dotted_crescent       2   crescent  dots      225, 45
    15  checkered_heart       2   heart     checker   270, 90
    16  shaded_triangle       3   triangle  shaded    315, 180
    17  checkered_star        3   star      checker   0, 225
    18  striped_cross         3   cross     stripes   45, 315
    19  dotted_heart          3   heart     dots      90, 0
    20  blotched_heart        3   heart     blotch    135, 225

Layout written (``DIR``): ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (mode 'L': 0
background, 1..20 classes, 255 band), ``lists/train.txt`` and ``lists/val.txt`` (``JPEGImages/<id>.jpg
SegmentationClassAug/<id>.png``), ``classes.txt``, ``meta.json`` (parameters, class table, counts,
recommended ``min_pixels``, fraction of novel objects in training images per fold) and ``COMPLETE``, written
last inside a temporary folder that is then renamed to ``DIR``.
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from fsseg.errors import ConfigError, DataError

GENERATOR = "fsseg-synth"
VERSION = "1.0"
COMPLETE_MARKER = "COMPLETE"
IGNORE = 255
NUM_CLASSES = 20
NUM_FOLDS = 4
SPLIT_CODES = {"train": 0, "val": 1}
_BANK_STREAM = 7  # SeedSequence stream of the per-run texture bank (splits use 0 and 1)
_LATENT_STREAM = 8  # SeedSequence stream of the latent-novel-object dial (its own, so default images are untouched)
# modelled minus measured share of the default benchmark (seed 0, 4000 training images: modelled 0.1975, measured
# 0.1852 / 0.1960 / 0.1821 / 0.1926 over folds 0-3, mean 0.189): placements that fail and base classes under min_pixels
_SHARE_OFFSET = 0.0085
LATENT_COUNT_MAX = 4  # latent objects per (image, fold) at most: the default images hold 1-4 objects
LATENT_EXTENT_RANGE = (0.08, 0.50)  # latent objects' diameter / image side: smaller ones are mostly 255 band,
#                                     larger ones than the default's largest (0.50) rarely fit beside the others

SHAPES = ("disc", "triangle", "star", "cross", "crescent", "heart")
TEXTURES = ("stripes", "checker", "dots", "blotch", "shaded")
_TEXTURE_ADJ = {"stripes": "striped", "checker": "checkered", "dots": "dotted", "blotch": "blotched",
                "shaded": "shaded"}
HUE_CENTRES = tuple(range(0, 360, 45))
# area of each shape at unit radius (measured), so a sampled size means the same area for every shape
_SHAPE_AREA = {"disc": 3.14, "triangle": 1.33, "star": 1.37, "cross": 2.23, "crescent": 1.40, "heart": 1.99,
               "polygon": 1.5}

# (shape, texture, (hue centre, hue centre)) in class-id order; fold f = ids 5f+1 .. 5f+5.
_CLASS_SPECS = (
    ("disc", "stripes", (0, 135)),
    ("triangle", "checker", (45, 270)),
    ("star", "blotch", (90, 180)),
    ("cross", "dots", (135, 315)),
    ("crescent", "shaded", (180, 45)),
    ("disc", "dots", (225, 90)),
    ("triangle", "blotch", (270, 0)),
    ("star", "shaded", (315, 225)),
    ("heart", "stripes", (0, 180)),
    ("crescent", "checker", (45, 135)),
    ("disc", "shaded", (90, 315)),
    ("star", "stripes", (135, 270)),
    ("cross", "blotch", (180, 0)),
    ("crescent", "dots", (225, 45)),
    ("heart", "checker", (270, 90)),
    ("triangle", "shaded", (315, 180)),
    ("star", "checker", (0, 225)),
    ("cross", "stripes", (45, 315)),
    ("heart", "dots", (90, 0)),
    ("heart", "blotch", (135, 225)),
)
CLASS_NAMES = tuple(f"{_TEXTURE_ADJ[t]}_{s}" for s, t, _ in _CLASS_SPECS)
_CLASS_PAIRS = {(s, t) for s, t, _ in _CLASS_SPECS}
HARD_NEGATIVES = tuple((s, t) for s in SHAPES for t in TEXTURES if (s, t) not in _CLASS_PAIRS)

# Photographs bundled with scikit-image (no download); colour ones get hue rotations, grey ones tints.
_PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                "retina", "camera", "brick", "grass", "gravel", "moon", "coins", "text", "page", "clock")


def fold_classes(fold: int) -> list[int]:
    """Novel class ids of ``fold`` (1-based ids 5*fold+1 .. 5*fold+5)."""
    return list(range(5 * fold + 1, 5 * fold + 6))


def class_table() -> list[dict]:
    """The class table as written to meta.json."""
    return [{"id": i + 1, "name": CLASS_NAMES[i], "fold": i // 5, "shape": s, "texture": t,
             "hue_centres": list(h)} for i, (s, t, h) in enumerate(_CLASS_SPECS)]


@dataclass(frozen=True)
class SynthParams:
    """Everything the output depends on (with the library versions recorded in meta.json)."""

    seed: int = 0
    n_train: int = 4000
    n_val: int = 1000
    size: int = 160  # longer image side
    short_min: int = 112  # shorter side drawn from [short_min, size]
    jpeg_quality: int = 95
    png_compress_level: int = 6
    objects_per_image_p: tuple = (0.35, 0.30, 0.20, 0.15)  # P(1..4 objects)
    p_same_class: float = 0.6  # an extra object repeats a class already in the image
    # object size: (p, lo, hi) of the area-equivalent diameter as a fraction of the image side sqrt(H*W)
    extent_bins: tuple = ((0.80, 0.20, 0.38), (0.12, 0.12, 0.20), (0.08, 0.38, 0.50))
    min_visible_frac: float = 0.55  # of each object's area after occlusion
    min_in_frame_frac: float = 0.7  # of each object's area inside the image
    band_width: int = 3  # width of the 255 band along outlines (pixels)
    p_hard_negative: float = 0.35  # image holds a no-class shape/texture pair (label 0)
    clutter_range: tuple = (1, 4)  # background distractors per image, inclusive
    p_occluder: float = 0.3  # thin occluders drawn over objects
    recommended_min_pixels: int = 512  # 2 * 16 * 16
    version: str = VERSION
    photos: tuple = field(default=_PHOTO_NAMES)
    # The latent-novel-object dial (issue 20): None = the generator as it always was (byte-identical output).
    # Target share of a fold's base-class training images that hold an object of that fold's novel classes
    # (meta.json novel_in_train.*.frac_base_images_with_novel); reached by adding objects to training images only.
    latent_share: float | None = None
    latent_count: int = 1  # objects added per (image, fold) that receives latent objects
    latent_extent: tuple | None = None  # (lo, hi) diameter / image side of the added objects; None = extent_bins

    def validate(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if self.n_train < 0 or self.n_val < 0 or self.n_train + self.n_val == 0:
            raise ConfigError(f"--train/--val must be >= 0 and not both 0, got {self.n_train}/{self.n_val}")
        if not 48 <= self.size <= 2048:
            raise ConfigError(f"--size must be in [48, 2048], got {self.size}")
        if self.band_width < 2:
            raise ConfigError(f"band_width must be >= 2, got {self.band_width}")
        if not 0 < self.short_min <= self.size:
            raise ConfigError(f"short_min {self.short_min} must be in (0, size={self.size}]")
        self._validate_latent()

    def _validate_latent(self) -> None:
        if self.latent_share is None:
            if self.latent_count != 1 or self.latent_extent is not None:
                raise ConfigError("--latent-count/--latent-size change the latent novel objects that --latent-share "
                                  "adds: give --latent-share too")
            return
        s = self.latent_share
        if not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ConfigError(f"--latent-share={s}: expected a share in [0, 1] of a fold's base-class training "
                              "images that hold one of its novel classes")
        if not isinstance(self.latent_count, int) or not 1 <= self.latent_count <= LATENT_COUNT_MAX:
            raise ConfigError(f"--latent-count={self.latent_count}: expected an integer in [1, {LATENT_COUNT_MAX}] "
                              "(latent objects added per image and fold)")
        if self.latent_extent is not None:
            ext = tuple(self.latent_extent)
            a, b = LATENT_EXTENT_RANGE
            if len(ext) != 2 or not a <= ext[0] <= ext[1] <= b:
                raise ConfigError(f"--latent-size={list(self.latent_extent)}: expected LO HI with {a} <= LO <= HI <= "
                                  f"{b} (object diameter / image side; smaller objects are mostly the 255 band, larger "
                                  "ones cannot be placed beside the others)")
        floor = default_latent_share(self)
        if s < floor - 1e-9:
            raise ConfigError(f"--latent-share={s}: below what the default generator already produces (~{floor:.2f}); "
                              "the dial only adds novel objects, so omit --latent-share for the default benchmark")

    def to_json(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        if self.latent_share is None:  # the default benchmark's meta.json stays byte-identical
            for k in ("latent_share", "latent_count", "latent_extent"):
                d.pop(k)
        return d

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val}


# --------------------------------------------------------------------------------------------- bank


class _Bank:
    """Per-run resources: downscaled photographs and tileable fractal-noise tiles (from the seed)."""

    TILE = 256

    def __init__(self, params: SynthParams):
        import skimage.data as skdata

        self.photos: list[np.ndarray] = []  # float32 HxWx3 (colour) or HxW (grey), 0..255
        self.photo_is_colour: list[bool] = []
        cap = max(2 * params.size, 256)
        for name in params.photos:
            im = np.asarray(getattr(skdata, name)())
            if im.dtype == bool:
                im = im.astype(np.uint8) * 255
            if im.ndim == 3:
                im = im[..., :3]
            scale = cap / min(im.shape[:2])
            if scale < 1:
                im = cv2.resize(im, (round(im.shape[1] * scale), round(im.shape[0] * scale)),
                                interpolation=cv2.INTER_AREA)
            colour = im.ndim == 3 and float(np.abs(im[..., 0].astype(int) - im[..., 1]).mean()) > 2
            if im.ndim == 3 and not colour:
                im = im[..., 0]
            self.photos.append(np.ascontiguousarray(im, dtype=np.float32))
            self.photo_is_colour.append(colour)
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, _BANK_STREAM]))
        self.noise = [self._fractal(rng, beta) for beta in (1.4, 1.8, 2.2, 2.6, 3.0, 2.0, 2.4, 3.0)]

    def _fractal(self, rng: np.random.Generator, beta: float) -> np.ndarray:
        n = self.TILE
        f = np.sqrt(np.fft.fftfreq(n)[:, None] ** 2 + np.fft.rfftfreq(n)[None, :] ** 2)
        f[0, 0] = 1.0
        spec = np.fft.rfft2(rng.standard_normal((n, n))) / f ** (beta / 2)
        spec[0, 0] = 0
        x = np.fft.irfft2(spec, s=(n, n))
        lo, hi = np.percentile(x, (1, 99))
        return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)

    def noise_field(self, rng: np.random.Generator, h: int, w: int, zoom: float | None = None) -> np.ndarray:
        """An h x w crop of a random noise tile, zoomed, values in [0, 1]."""
        tile = self.noise[int(rng.integers(len(self.noise)))]
        z = zoom if zoom is not None else float(rng.uniform(0.6, 2.5))
        ys = (np.arange(h, dtype=np.float32) / z + rng.uniform(0, self.TILE))[:, None]
        xs = (np.arange(w, dtype=np.float32) / z + rng.uniform(0, self.TILE))[None, :]
        return _sample_wrap(tile, np.broadcast_to(xs, (h, w)), np.broadcast_to(ys, (h, w)))


_BANK: _Bank | None = None
_BANK_KEY = None


def _get_bank(params: SynthParams) -> _Bank:
    global _BANK, _BANK_KEY
    key = (params.seed, params.size, params.photos)
    if _BANK is None or _BANK_KEY != key:
        _BANK, _BANK_KEY = _Bank(params), key
    return _BANK


def _sample_wrap(tile: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = tile.shape[0]
    return cv2.remap(tile, np.mod(x, n).astype(np.float32), np.mod(y, n).astype(np.float32),
                     interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)


# --------------------------------------------------------------------------------------------- colour


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360.0, s, v), np.float32) * 255


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv(rng.uniform(0, 360), rng.uniform(0.1, 1.0), rng.uniform(0.15, 1.0))


def _class_colours(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """Main colour from one of the class's hue centres (jittered), second colour class-free."""
    hues = _CLASS_SPECS[cls - 1][2]
    hue = hues[int(rng.integers(2))] + rng.uniform(-16, 16)
    c1 = _hsv(hue, rng.uniform(0.45, 0.95), rng.uniform(0.5, 0.97))
    return c1, _second_colour(rng)


def _second_colour(rng: np.random.Generator) -> np.ndarray:
    k = rng.random()
    if k < 0.33:
        return _hsv(rng.uniform(0, 360), rng.uniform(0, 0.6), rng.uniform(0.05, 0.3))  # dark
    if k < 0.66:
        return _hsv(rng.uniform(0, 360), rng.uniform(0, 0.2), rng.uniform(0.8, 1.0))  # light
    return _hsv(rng.uniform(0, 360), rng.uniform(0.3, 0.9), rng.uniform(0.35, 0.9))


# --------------------------------------------------------------------------------------------- shapes


def _resample(poly: np.ndarray, n: int) -> np.ndarray:
    """Points evenly spaced along a closed polygon (so radial deformations bend its edges)."""
    closed = np.vstack([poly, poly[:1]])
    seg = np.sqrt((np.diff(closed, axis=0) ** 2).sum(1))
    cum = np.concatenate([[0], np.cumsum(seg)])
    t = np.linspace(0, cum[-1], n, endpoint=False)
    return np.stack([np.interp(t, cum, closed[:, 0]), np.interp(t, cum, closed[:, 1])], 1)


def _circle(n: int = 72, cx: float = 0.0, cy: float = 0.0, r: float = 1.0) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)


def _shape_contours(shape: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Contours in unit coordinates (max radius ~1); sign +1 fills, -1 cuts out."""
    if shape == "disc":
        return [(_circle(), 1)]
    if shape == "triangle":
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return [(_resample(np.stack([np.cos(a), np.sin(a)], 1), 90), 1)]
    if shape == "star":
        k = 5
        inner = rng.uniform(0.4, 0.5)
        a = np.pi / 2 + np.arange(2 * k) * np.pi / k
        r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
        return [(_resample(np.stack([r * np.cos(a), r * np.sin(a)], 1), 100), 1)]
    if shape == "cross":
        w = rng.uniform(0.28, 0.38)
        p = np.array([[w, w], [1, w], [1, -w], [w, -w], [w, -1], [-w, -1], [-w, -w], [-1, -w], [-1, w],
                      [-w, w], [-w, 1], [w, 1]])
        return [(_resample(p, 96), 1)]
    if shape == "crescent":
        d = rng.uniform(0.42, 0.6)
        return [(_circle(), 1), (_circle(cx=d, cy=-0.1, r=rng.uniform(0.8, 0.9)), -1)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y + 2.5], 1) / 17.0
        return [(pts, 1)]
    if shape == "polygon":  # distractor: irregular polygon
        k = int(rng.integers(3, 9))
        a = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(0.45, 1.0, k)
        return [(_resample(np.stack([r * np.cos(a), r * np.sin(a)], 1), 80), 1)]
    raise ValueError(shape)


@dataclass
class _Placed:
    alpha: np.ndarray  # float32 (h, w) soft coverage, 0..1, of the patch
    hard: np.ndarray  # bool (h, w)
    x0: int
    y0: int
    u: np.ndarray  # local texture coordinates (unit = object radius)
    v: np.ndarray
    radius: float


def _place_shape(rng: np.random.Generator, shape: str, radius: float, cx: float, cy: float,
                 deform: float = 1.0) -> _Placed | None:
    """Deform, rotate, scale and rasterise a shape at (cx, cy); returns the unclipped patch."""
    contours = _shape_contours(shape, rng)
    a2, a3 = rng.uniform(0, 0.08, 2) * deform
    p2, p3 = rng.uniform(0, 2 * np.pi, 2)
    bend = rng.uniform(-0.18, 0.18) * deform
    aspect = float(np.exp(rng.uniform(-0.22, 0.22) * deform))
    rot = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(rot), np.sin(rot)
    warped = []
    for pts, sign in contours:
        th = np.arctan2(pts[:, 1], pts[:, 0])
        f = 1 + a2 * np.cos(2 * th - p2) + a3 * np.cos(3 * th - p3)
        x = pts[:, 0] * f * aspect
        y = (pts[:, 1] * f + bend * pts[:, 0] ** 2) / aspect
        warped.append((np.stack([cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)], 1), sign))
    allpts = np.vstack([w for w, _ in warped])
    x0, y0 = int(np.floor(allpts[:, 0].min())) - 1, int(np.floor(allpts[:, 1].min())) - 1
    x1, y1 = int(np.ceil(allpts[:, 0].max())) + 2, int(np.ceil(allpts[:, 1].max())) + 2
    h, w = y1 - y0, x1 - x0
    if h < 3 or w < 3:
        return None
    cover = None
    for pts, sign in warped:
        m = np.zeros((h, w), np.uint8)
        q = np.round((pts - [x0, y0]) * 8).astype(np.int32)
        cv2.fillPoly(m, [q], 255, lineType=cv2.LINE_AA, shift=3)
        m = m.astype(np.float32) / 255
        cover = m if cover is None else (cover + m if sign > 0 else cover * (1 - m))
    cover = np.clip(cover, 0, 1)
    hard = cover >= 0.5
    if not hard.any():
        return None
    gx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
    gy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
    u = (c * gx + s * gy) / radius
    v = (-s * gx + c * gy) / radius
    return _Placed(cover, hard, x0, y0, u, v, radius)


# --------------------------------------------------------------------------------------------- textures


def _rotate_uv(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = rng.uniform(0, np.pi)
    return np.cos(b) * u + np.sin(b) * v, -np.sin(b) * u + np.cos(b) * v


def _blend(m: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    m = m[..., None]
    return c1 * (1 - m) + c2 * m


def _texture(rng: np.random.Generator, bank: _Bank, kind: str, pl: _Placed, c1: np.ndarray,
             c2: np.ndarray) -> np.ndarray:
    """Texture of a placed object in its own (rotating, scaling) coordinates; float32 (h, w, 3)."""
    u, v = pl.u, pl.v
    px = 1.0 / pl.radius  # one pixel in unit coordinates (anti-aliasing width)
    if kind == "stripes":
        a, _ = _rotate_uv(rng, u, v)
        period = rng.uniform(0.4, 0.6)
        s = np.sin(2 * np.pi * a / period + rng.uniform(0, 2 * np.pi))
        out = _blend(np.clip(0.5 + s * period / (4 * px), 0, 1), c1, c2)
    elif kind == "checker":
        a, b = _rotate_uv(rng, u, v)
        cell = rng.uniform(0.32, 0.46)
        s = np.sin(np.pi * a / cell + rng.uniform(0, 6.3)) * np.sin(np.pi * b / cell + rng.uniform(0, 6.3))
        out = _blend(np.clip(0.5 + s * cell / (2 * px), 0, 1), c1, c2)
    elif kind == "dots":
        a, b = _rotate_uv(rng, u, v)
        sp = rng.uniform(0.5, 0.62)
        rad = sp * rng.uniform(0.26, 0.34)
        da = (np.mod(a / sp + rng.uniform(0, 1), 1) - 0.5) * sp
        db = (np.mod(b / sp + rng.uniform(0, 1), 1) - 0.5) * sp
        d = np.sqrt(da * da + db * db)
        out = _blend(np.clip((rad - d) / px + 0.5, 0, 1), c1, c2)
    elif kind == "blotch":
        tile = bank.noise[int(rng.integers(3, 5))]
        sc = rng.uniform(26, 34)
        n = _sample_wrap(tile, u * sc + rng.uniform(0, 256), v * sc + rng.uniform(0, 256))
        out = _blend(np.clip((n - rng.uniform(0.42, 0.58)) * 9 + 0.5, 0, 1), c1, c2)
    elif kind == "shaded":
        lx, ly = np.cos(t := rng.uniform(0, 2 * np.pi)), np.sin(t)
        r2 = np.clip(u * u + v * v, 0, 1)
        nz = np.sqrt(1 - r2)
        lam = np.clip(0.45 * (u * lx + v * ly) * 0.8 + 0.6 * nz + 0.35, 0.2, 1.15)
        spec = np.clip(u * lx * 0.7 + v * ly * 0.7 + nz * 0.7, 0, 1) ** 12 * 0.35
        out = c1 * lam[..., None] + 255 * spec[..., None]
    elif kind == "plain":
        out = np.broadcast_to(c1, u.shape + (3,)).astype(np.float32)
    elif kind == "noise":
        n = bank.noise_field(rng, *u.shape)
        out = _blend(n, c1, c2)
    elif kind == "photo":
        out = _photo_crop(rng, bank, *u.shape)
    else:
        raise ValueError(kind)
    # lighting gradient and grain
    g = 1 + rng.uniform(-0.15, 0.15) * u + rng.uniform(-0.15, 0.15) * v
    out = out * g[..., None]
    out = out + np.float32(rng.uniform(2, 7)) * rng.standard_normal(out.shape[:2] + (1,), dtype=np.float32)
    return out.astype(np.float32)


def _composite(img: np.ndarray, pl: _Placed, tex: np.ndarray) -> tuple[slice, slice, np.ndarray] | None:
    """Alpha-composite a placed patch into ``img`` (clipped); returns the image slices and hard mask."""
    H, W = img.shape[:2]
    h, w = pl.hard.shape
    ys, xs = max(pl.y0, 0), max(pl.x0, 0)
    ye, xe = min(pl.y0 + h, H), min(pl.x0 + w, W)
    if ye <= ys or xe <= xs:
        return None
    py, px = slice(ys - pl.y0, ye - pl.y0), slice(xs - pl.x0, xe - pl.x0)
    a = pl.alpha[py, px][..., None]
    sy, sx = slice(ys, ye), slice(xs, xe)
    img[sy, sx] = img[sy, sx] * (1 - a) + tex[py, px] * a
    return sy, sx, pl.hard[py, px]


def _clip_hard(pl: _Placed, H: int, W: int):
    h, w = pl.hard.shape
    ys, xs = max(pl.y0, 0), max(pl.x0, 0)
    ye, xe = min(pl.y0 + h, H), min(pl.x0 + w, W)
    if ye <= ys or xe <= xs:
        return None
    return slice(ys, ye), slice(xs, xe), pl.hard[ys - pl.y0:ye - pl.y0, xs - pl.x0:xe - pl.x0]


# --------------------------------------------------------------------------------------------- background


def _photo_crop(rng: np.random.Generator, bank: _Bank, h: int, w: int) -> np.ndarray:
    k = int(rng.integers(len(bank.photos)))
    ph = bank.photos[k]
    PH, PW = ph.shape[:2]
    frac = rng.uniform(0.25, 0.9)
    ch = max(4, int(min(PH, PW * h / w) * frac))
    cw = max(4, int(ch * w / h))
    cw = min(cw, PW)
    y = int(rng.integers(0, PH - ch + 1))
    x = int(rng.integers(0, PW - cw + 1))
    crop = cv2.resize(ph[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.2:
        crop = crop[::-1]
    if bank.photo_is_colour[k]:
        hsv = cv2.cvtColor(np.clip(crop, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(0, 180))) % 180).astype(np.uint8)
        sat = hsv[..., 1].astype(np.float32) * rng.uniform(0.6, 1.3)
        hsv[..., 1] = np.clip(sat, 0, 255).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    else:
        g = (crop / 255.0).astype(np.float32)
        out = _blend(g, _random_colour(rng) * 0.5, _hsv(rng.uniform(0, 360), rng.uniform(0, 0.7),
                                                          rng.uniform(0.6, 1.0)))
    gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    return np.ascontiguousarray(out * gain * rng.uniform(0.7, 1.15) + rng.uniform(-20, 20), np.float32)


def _procedural(rng: np.random.Generator, bank: _Bank, h: int, w: int) -> np.ndarray:
    k = rng.random()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if k < 0.5:
        out = _blend(bank.noise_field(rng, h, w), _random_colour(rng), _random_colour(rng))
    elif k < 0.75:
        a = rng.uniform(0, np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        period = rng.uniform(10, 40)
        m = np.clip(0.5 + 2 * np.sin(2 * np.pi * t / period), 0, 1) * rng.uniform(0.2, 0.7)
        if rng.random() < 0.5:
            m = m * (np.sin(2 * np.pi * (np.cos(a) * yy - np.sin(a) * xx) / period) > 0)
        out = _blend(m, _random_colour(rng), _random_colour(rng))
    else:
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy) / max(h, w)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        out = _blend(t, _random_colour(rng), _random_colour(rng))
        out += (bank.noise_field(rng, h, w)[..., None] - 0.5) * rng.uniform(10, 60)
    return out.astype(np.float32)


def _background(rng: np.random.Generator, bank: _Bank, h: int, w: int) -> np.ndarray:
    k = rng.random()
    if k < 0.35:
        return _photo_crop(rng, bank, h, w)
    if k < 0.5:
        return _procedural(rng, bank, h, w)
    a, b = _photo_crop(rng, bank, h, w), (
        _procedural(rng, bank, h, w) if rng.random() < 0.6 else _photo_crop(rng, bank, h, w))
    if k < 0.75:  # translucent mix
        return a * (1 - (t := rng.uniform(0.2, 0.5))) + b * t
    m = bank.noise_field(rng, h, w, zoom=rng.uniform(0.4, 1.2))  # patchwork of regions
    m = np.clip((m - rng.uniform(0.4, 0.6)) * 12 + 0.5, 0, 1)[..., None]
    return a * (1 - m) + b * m


def _clutter(rng: np.random.Generator, bank: _Bank, img: np.ndarray, side: float) -> None:
    """A distractor that belongs to no class (label 0)."""
    H, W = img.shape[:2]
    k = rng.random()
    if k < 0.45:  # textured irregular polygon
        r = side * rng.uniform(0.05, 0.15)
        pl = _place_shape(rng, "polygon", r, rng.uniform(0, W), rng.uniform(0, H))
        if pl is not None:
            kind = ("plain", "noise", "photo", "stripes", "checker", "dots", "blotch", "shaded")[
                int(rng.integers(8))]
            _composite(img, pl, _texture(rng, bank, kind, pl, _random_colour(rng), _random_colour(rng)))
    elif k < 0.75:  # scribble
        n = int(rng.integers(3, 9))
        p = np.cumsum(rng.normal(0, side * 0.08, (n, 2)), 0) + [rng.uniform(0, W), rng.uniform(0, H)]
        m = np.zeros((H, W), np.uint8)
        cv2.polylines(m, [np.round(p * 8).astype(np.int32)], False, 255, int(rng.integers(1, 4)),
                      lineType=cv2.LINE_AA, shift=3)
        a = (m.astype(np.float32) / 255)[..., None]
        img[:] = img * (1 - a) + _random_colour(rng) * a
    else:  # outline ellipse or rectangle
        m = np.zeros((H, W), np.uint8)
        c = (int(rng.uniform(0, W) * 8), int(rng.uniform(0, H) * 8))
        ax = (int(side * rng.uniform(0.04, 0.15) * 8), int(side * rng.uniform(0.04, 0.15) * 8))
        cv2.ellipse(m, c, ax, float(rng.uniform(0, 180)), 0, 360, 255, int(rng.integers(1, 3)),
                    lineType=cv2.LINE_AA, shift=3)
        a = (m.astype(np.float32) / 255)[..., None]
        img[:] = img * (1 - a) + _random_colour(rng) * a


# --------------------------------------------------------------------------------------------- image


def _sample_classes(rng: np.random.Generator, p: SynthParams) -> list[int]:
    n = int(rng.choice(len(p.objects_per_image_p), p=np.asarray(p.objects_per_image_p))) + 1
    classes = [int(rng.integers(1, NUM_CLASSES + 1))]
    for _ in range(n - 1):
        if rng.random() < p.p_same_class:
            classes.append(classes[int(rng.integers(len(classes)))])
        else:
            others = [c for c in range(1, NUM_CLASSES + 1) if c not in classes]
            classes.append(others[int(rng.integers(len(others)))])
    return classes


def _sample_extent(rng: np.random.Generator, p: SynthParams) -> float:
    probs = np.asarray([b[0] for b in p.extent_bins], np.float64)
    lo, hi = p.extent_bins[int(rng.choice(len(probs), p=probs / probs.sum()))][1:]
    return float(rng.uniform(lo, hi))


def _radius(shape: str, diameter: float) -> float:
    """Unit-radius scale that gives ``shape`` the area of a disc of ``diameter``."""
    return diameter / 2 * float(np.sqrt(np.pi / _SHAPE_AREA[shape]))


def boundary_band(inst: np.ndarray, width: int) -> np.ndarray:
    """Pixels within the band along every transition between different instance ids (0 included)."""
    e = np.zeros(inst.shape, np.uint8)
    dx = inst[:, :-1] != inst[:, 1:]
    dy = inst[:-1, :] != inst[1:, :]
    e[:, :-1] |= dx
    e[:-1, :] |= dy
    e[:, 1:] |= dx  # both sides of a transition, so no object pixel touches another label
    e[1:, :] |= dy
    if width > 2:
        e = cv2.dilate(e, np.ones((width - 1, width - 1), np.uint8))
    return e.astype(bool)


def _place_object(rng: np.random.Generator, bank: _Bank, params: SynthParams, img: np.ndarray, inst: np.ndarray,
                  kept: list[int], full: list[int], cls: int, ext: float, attempts: int = 8) -> bool:
    """Place one object of class ``cls`` (diameter ``ext`` x image side, shrunk by 0.9 whenever it would hide
    more than ``1 - min_visible_frac`` of an earlier object); updates img, inst, kept, full. False if no try fits."""
    H, W = inst.shape
    side = float(np.sqrt(H * W))
    shape, tex, _ = _CLASS_SPECS[cls - 1]
    for _attempt in range(attempts):
        r = _radius(shape, side * ext)
        cx, cy = rng.uniform(0.15 * r, W - 0.15 * r), rng.uniform(0.15 * r, H - 0.15 * r)
        pl = _place_shape(rng, shape, r, cx, cy)
        if pl is None:
            continue
        clip = _clip_hard(pl, H, W)
        if clip is None:
            continue
        sy, sx, hard = clip
        area = int(hard.sum())
        if area < params.min_in_frame_frac * pl.hard.sum() or area == 0:
            continue
        if kept:
            counts = np.bincount(inst[sy, sx][hard], minlength=len(kept) + 1)[1:]
            vis = np.bincount(inst.ravel(), minlength=len(kept) + 1)[1:]
            if np.any(vis - counts < params.min_visible_frac * np.asarray(full)):
                ext *= 0.9
                continue
        c1, c2 = _class_colours(rng, cls)
        _composite(img, pl, _texture(rng, bank, tex, pl, c1, c2))
        inst[sy, sx][hard] = len(kept) + 1
        kept.append(cls)
        full.append(area)
        return True
    return False


# --------------------------------------------------------------------------------------------- latent dial


def _fold_of(cls: int) -> int:
    return (cls - 1) // 5


@lru_cache(maxsize=8)
def _fold_count_hist(objects_per_image_p: tuple, p_same_class: float, draws: int = 20000) -> tuple:
    """P(an image's sampled classes span k = 1..4 folds), from ``_sample_classes`` itself (fixed generator:
    the calibration is a property of the generator, not of a dataset seed)."""
    p = SynthParams(objects_per_image_p=objects_per_image_p, p_same_class=p_same_class)
    rng = np.random.default_rng(np.random.SeedSequence([_LATENT_STREAM, 0]))
    hist = np.zeros(NUM_FOLDS + 1)
    for _ in range(draws):
        hist[len({_fold_of(c) for c in _sample_classes(rng, p)})] += 1
    return tuple(hist / draws)


def modelled_share(params: SynthParams, rate: float) -> float:
    """Share of a fold's base-class training images holding one of its novel classes when every training image
    receives, for each fold absent from it, latent objects of that fold with probability ``rate``.

    Pooled over (image, fold) pairs, for an image whose classes span k folds: each of its k folds f is novel in a
    base image if k >= 2, or, for k = 1, if any of the 3 absent folds was added (1 - (1 - rate)^3); each of the
    4 - k absent folds counts as a base image that holds f with probability ``rate``. Assumes every object is
    placed and every base class qualifies (min_pixels), so it reads a few points above the measured share."""
    h = _fold_count_hist(tuple(params.objects_per_image_p), float(params.p_same_class))
    q1 = 1 - (1 - rate) ** (NUM_FOLDS - 1)
    num = h[1] * q1 + sum(h[k] * k for k in range(2, NUM_FOLDS + 1)) + sum(
        h[k] * (NUM_FOLDS - k) * rate for k in range(1, NUM_FOLDS + 1))
    den = h[1] * q1 + sum(h[k] * k for k in range(2, NUM_FOLDS + 1)) + sum(
        h[k] * (NUM_FOLDS - k) for k in range(1, NUM_FOLDS + 1))
    return float(num / den)


def default_latent_share(params: SynthParams) -> float:
    """The share the generator gives without latent objects (modelled at rate 0, less the measured offset)."""
    return modelled_share(params, 0.0) - _SHARE_OFFSET


def latent_rate(params: SynthParams) -> float:
    """The per-(image, absent fold) probability of adding latent objects that gives ``latent_share`` (bisection
    on :func:`modelled_share`, offset by the measured default's shortfall against the model, ``_SHARE_OFFSET``)."""
    target = min(1.0, params.latent_share + _SHARE_OFFSET)
    lo, hi = 0.0, 1.0
    if modelled_share(params, hi) <= target:
        return 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if modelled_share(params, mid) < target else (lo, mid)
    return (lo + hi) / 2


def latent_dirname(share: float) -> str:
    """The data directory name of a dial setting: 0.4 -> synth_latent40."""
    return f"synth_latent{round(100 * share):02d}"


def _add_latent_objects(params: SynthParams, index: int, bank: _Bank, img: np.ndarray, inst: np.ndarray,
                        kept: list[int], full: list[int]) -> None:
    """The dial: for each fold with no object in this training image, with probability ``latent_rate``, add
    ``latent_count`` objects of that fold's classes on top (own random stream: the image's other content and
    every image without latent objects are unchanged)."""
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, _LATENT_STREAM, index]))
    rate = latent_rate(params)
    present = {_fold_of(c) for c in kept}
    for f in range(NUM_FOLDS):
        if f in present or rng.random() >= rate:
            continue
        for _ in range(params.latent_count):
            cls = fold_classes(f)[int(rng.integers(5))]
            if params.latent_extent is None:
                ext = _sample_extent(rng, params)
            else:
                ext = float(rng.uniform(*params.latent_extent))
            _place_object(rng, bank, params, img, inst, kept, full, cls, ext, attempts=16)


def render_image(params: SynthParams, split: str, index: int, bank: _Bank | None = None):
    """Render one image; returns (rgb uint8 HxWx3, label uint8 HxW, list of instance classes)."""
    bank = bank or _get_bank(params)
    rng = np.random.default_rng(np.random.SeedSequence([params.seed, SPLIT_CODES[split], index]))
    short = int(rng.integers(params.short_min, params.size + 1))
    H, W = (short, params.size) if rng.random() < 0.6 else (params.size, short)
    side = float(np.sqrt(H * W))
    img = _background(rng, bank, H, W)
    for _ in range(int(rng.integers(params.clutter_range[0], params.clutter_range[1] + 1))):
        _clutter(rng, bank, img, side)
    if rng.random() < params.p_hard_negative:  # a no-class shape/texture pair, same look as the classes
        shape, tex = HARD_NEGATIVES[int(rng.integers(len(HARD_NEGATIVES)))]
        r = _radius(shape, side * _sample_extent(rng, params))
        pl = _place_shape(rng, shape, r, rng.uniform(0, W), rng.uniform(0, H))
        if pl is not None:
            c1 = _hsv(HUE_CENTRES[int(rng.integers(8))] + rng.uniform(-16, 16), rng.uniform(0.45, 0.95),
                      rng.uniform(0.5, 0.97))
            _composite(img, pl, _texture(rng, bank, tex, pl, c1, _second_colour(rng)))

    inst = np.zeros((H, W), np.int16)
    full: list[int] = []
    kept: list[int] = []
    for cls in _sample_classes(rng, params):
        _place_object(rng, bank, params, img, inst, kept, full, cls, _sample_extent(rng, params))
    if params.latent_share is not None and split == "train" and kept:
        _add_latent_objects(params, index, bank, img, inst, kept, full)

    if rng.random() < params.p_occluder and kept:  # thin occluders over the objects (label 0)
        m = np.zeros((H, W), np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            p0 = (rng.uniform(0, W), rng.uniform(0, H))
            ang = rng.uniform(0, np.pi)
            ln = side * rng.uniform(0.3, 0.9)
            p1 = (p0[0] + ln * np.cos(ang), p0[1] + ln * np.sin(ang))
            cv2.line(m, (int(p0[0] * 8), int(p0[1] * 8)), (int(p1[0] * 8), int(p1[1] * 8)), 255,
                     int(rng.integers(2, 4)), lineType=cv2.LINE_AA, shift=3)
        a = (m.astype(np.float32) / 255)[..., None]
        img[:] = img * (1 - a) + _random_colour(rng) * a
        inst[m >= 128] = 0

    # global photometric jitter: contrast, brightness, blur, sensor noise
    img = (img - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-12, 12)
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.4, 0.8))
    img = img + np.float32(rng.uniform(1, 4)) * rng.standard_normal((H, W, 1), dtype=np.float32)
    rgb = np.clip(np.round(img), 0, 255).astype(np.uint8)

    lut = np.array([0] + kept, np.uint8)
    label = lut[inst]
    label[boundary_band(inst, params.band_width)] = IGNORE
    return rgb, label, kept


# --------------------------------------------------------------------------------------------- writing


def image_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def _work(task):
    params, root, split, index = task
    rgb, label, kept = render_image(params, split, index)
    iid = image_id(split, index)
    Image.fromarray(rgb, "RGB").save(Path(root, "JPEGImages", iid + ".jpg"), format="JPEG",
                                     quality=params.jpeg_quality, subsampling=2, optimize=False,
                                     progressive=False)
    Image.fromarray(label, "L").save(Path(root, "SegmentationClassAug", iid + ".png"), format="PNG",
                                     compress_level=params.png_compress_level, optimize=False)
    px = np.bincount(label.ravel(), minlength=256)[1:NUM_CLASSES + 1].tolist()
    return split, index, label.shape, kept, px


def _init_worker(params: SynthParams) -> None:
    cv2.setNumThreads(1)
    _get_bank(params)


def _summarise(params: SynthParams, results: list) -> dict:
    mp_ = params.recommended_min_pixels
    splits: dict[str, dict] = {}
    for split in ("train", "val"):
        rows = [r for r in results if r[0] == split]
        per_class = []
        for c in range(1, NUM_CLASSES + 1):
            per_class.append({
                "id": c,
                "images": sum(1 for r in rows if r[4][c - 1] > 0),
                "images_ge_min_pixels": sum(1 for r in rows if r[4][c - 1] >= mp_),
                "images_ge_2048": sum(1 for r in rows if r[4][c - 1] >= 2048),
                "objects": sum(r[3].count(c) for r in rows),
            })
        n_obj = [len(r[3]) for r in rows]
        splits[split] = {
            "images": len(rows),
            "objects": int(sum(n_obj)),
            "objects_per_image_hist": {str(k): n_obj.count(k) for k in range(5)},
            "per_class": per_class,
        }
    novel = {}
    train = [r for r in results if r[0] == "train"]
    for f in range(NUM_FOLDS):
        nov = set(fold_classes(f))
        n_nov = n_nov_in_base = n_base_img = n_base_img_with_nov = 0
        for r in train:
            px = r[4]
            base_img = any(px[c - 1] >= mp_ for c in range(1, NUM_CLASSES + 1) if c not in nov)
            k = sum(1 for c in r[3] if c in nov)
            n_nov += k
            if base_img:
                n_base_img += 1
                n_nov_in_base += k
                n_base_img_with_nov += k > 0
        novel[str(f)] = {
            "novel_objects": n_nov,
            "novel_objects_in_base_images": n_nov_in_base,
            "frac_novel_objects_in_base_images": round(n_nov_in_base / max(n_nov, 1), 4),
            "base_images": n_base_img,
            "base_images_with_novel": n_base_img_with_nov,
            "frac_base_images_with_novel": round(n_base_img_with_nov / max(n_base_img, 1), 4),
        }
    return {"splits": splits, "novel_in_train": novel}


def _meta(params: SynthParams, summary: dict) -> dict:
    import PIL

    return {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": params.seed,
        "params": params.to_json(),
        "classes": class_table(),
        "folds": {str(f): fold_classes(f) for f in range(NUM_FOLDS)},
        "hard_negative_pairs": [f"{_TEXTURE_ADJ[t]}_{s}" for s, t in HARD_NEGATIVES],
        "counts": {s: n for s, n in params.split_sizes().items()},
        "recommended_min_pixels": params.recommended_min_pixels,
        "ignore_index": IGNORE,
        "layout": {"images": "JPEGImages/<id>.jpg", "labels": "SegmentationClassAug/<id>.png",
                   "lists": ["lists/train.txt", "lists/val.txt"]},
        "novel_in_train": summary["novel_in_train"],
        "stats": summary["splits"],
        "libraries": {"numpy": np.__version__, "opencv": cv2.__version__, "pillow": PIL.__version__},
    }


def is_complete(out: str | os.PathLike) -> bool:
    """True when ``out`` holds a finished benchmark (COMPLETE marker and meta.json)."""
    out = Path(out)
    return (out / COMPLETE_MARKER).is_file() and (out / "meta.json").is_file()


def read_meta(out: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(out) / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{out}/meta.json: unreadable ({e})") from e


_OWN_NAMES = {"JPEGImages", "SegmentationClassAug", "lists", "classes.txt", "meta.json", COMPLETE_MARKER}


def _remove_stale_tmp(out: Path) -> None:
    """Remove temporary folders left by killed runs (their process is gone)."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # that run is still going
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def generate(out: str | os.PathLike, params: SynthParams, workers: int = 1, force: bool = False,
             log=print) -> dict:
    """Generate the benchmark into ``out`` (idempotent); returns a summary dict with ``status``."""
    params.validate()
    out = Path(out)
    if is_complete(out):
        try:
            old = read_meta(out).get("params")
        except DataError:
            old = None
        if old == params.to_json():
            log(f"fsseg-synth: {out} already holds this benchmark (seed {params.seed}); nothing to do")
            return {"status": "exists", "out": str(out)}
        if not force:
            raise ConfigError(f"{out} holds a benchmark generated with other parameters or seed "
                              f"(seed {old.get('seed') if isinstance(old, dict) else '?'}); "
                              "use --force to replace it")
    elif out.exists() and not force:
        if not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OWN_NAMES)
        if foreign:
            raise ConfigError(f"--out {out} is an unfinished directory holding other files "
                              f"({', '.join(foreign[:5])}); use --force to replace it")

    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for d in ("JPEGImages", "SegmentationClassAug", "lists"):
        (tmp / d).mkdir(parents=True)
    try:
        tasks = [(params, str(tmp), s, i) for s, n in params.split_sizes().items() for i in range(n)]
        workers = max(1, min(int(workers), len(tasks)))
        if workers == 1:
            _init_worker(params)
            results = [_work(t) for t in tasks]
        else:
            # spawn, not fork: forking after OpenCV has started its thread pool can deadlock the children
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(params,)) as pool:
                chunk = max(1, min(64, len(tasks) // (8 * workers)))
                results = list(pool.imap(_work, tasks, chunksize=chunk))
        for split, n in params.split_sizes().items():
            lines = [f"JPEGImages/{image_id(split, i)}.jpg SegmentationClassAug/{image_id(split, i)}.png\n"
                     for i in range(n)]
            (tmp / "lists" / f"{split}.txt").write_text("".join(lines))
        (tmp / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
        summary = _summarise(params, results)
        meta = _meta(params, summary)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (tmp / COMPLETE_MARKER).write_text(f"{GENERATOR} {VERSION} seed={params.seed}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - t0
    return {"status": "generated", "out": str(out), "seconds": elapsed, "meta": meta}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checksums(out: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under ``out`` (relative path -> hex digest)."""
    out = Path(out)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- colour cue


def _best_threshold_iou(pos: np.ndarray, neg: np.ndarray, both: bool = True) -> float:
    """Best IoU of ``value <= t`` (and, if ``both``, ``value >= t``) from per-bin pixel counts."""
    P = float(pos.sum())
    best = 0.0
    for p, n in ((pos, neg), (pos[::-1], neg[::-1])) if both else ((pos, neg),):
        tp = np.cumsum(p).astype(np.float64)
        fp = np.cumsum(n).astype(np.float64)
        best = max(best, float((tp / np.maximum(P + fp, 1)).max()))
    return best


def _dist_hist(rgb: np.ndarray, ref: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((rgb - ref) ** 2).sum(-1))
    q = np.minimum((d / 2).astype(np.int64), 255)  # 2-unit bins
    return np.bincount(q[m], minlength=256), np.bincount(q[~m], minlength=256)


def colour_cue_iou(root: str | os.PathLike, split: str = "val", max_images: int | None = None) -> dict:
    """How far colour alone goes. Per class, the best pixel IoU (255 ignored; thresholds chosen with the
    labels, so each number is an oracle upper bound for that colour-only cue) of

    * ``channel``: thresholding one channel (R, G, B, H, S or V; best channel, threshold, direction),
      over all images of the split;
    * ``mean_colour``: thresholding the RGB distance to the class's mean colour, over all images;
    * ``channel_in_class_images`` / ``mean_colour_in_class_images``: the same over the images that hold
      the class only (the few-shot setting: the query is known to contain it);
    * ``own_colour``: the distance to the mean colour of the object's own pixels in the same image (a
      perfect support colour), best threshold per class, over the images that hold the class.
    Returned: per-class numbers and their means and maxima over classes.
    """
    root = Path(root)
    lines = [ln.split() for ln in (root / "lists" / f"{split}.txt").read_text().split("\n") if ln.strip()]
    lines = lines[:max_images]
    feats, labs = [], []
    for im, lb in lines:
        rgb = np.asarray(Image.open(root / im).convert("RGB"))
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        lab = np.asarray(Image.open(root / lb)).reshape(-1)
        keep = lab != IGNORE
        feats.append(np.concatenate([rgb, hsv], -1).reshape(-1, 6)[keep])
        labs.append(lab[keep])
    present = [set(np.unique(lb).tolist()) for lb in labs]
    allf = np.concatenate(feats)
    alll = np.concatenate(labs).astype(np.int64)
    names = ("R", "G", "B", "H", "S", "V")
    joint = [np.bincount(alll * 256 + allf[:, k], minlength=256 * 256).reshape(256, 256) for k in range(6)]
    per_class: dict[int, dict] = {}
    for c in range(1, NUM_CLASSES + 1):
        idx = [i for i, pr in enumerate(present) if c in pr]
        if not idx:
            continue
        res: dict = {"images": len(idx), "fraction_of_pixels": float((alll == c).mean())}
        res["channel"] = max(_best_threshold_iou(j[c], j.sum(0) - j[c]) for j in joint)
        m_all = alll == c
        mean_c = allf[m_all, :3].astype(np.float32).mean(0)
        res["mean_colour"] = _best_threshold_iou(*_dist_hist(allf[:, :3].astype(np.float32), mean_c, m_all),
                                                 both=False)
        f = np.concatenate([feats[i] for i in idx])
        m = np.concatenate([labs[i] for i in idx]) == c
        res["channel_in_class_images"] = max(
            _best_threshold_iou(np.bincount(f[m, k], minlength=256), np.bincount(f[~m, k], minlength=256))
            for k in range(6))
        rgbf = f[:, :3].astype(np.float32)
        res["mean_colour_in_class_images"] = _best_threshold_iou(*_dist_hist(rgbf, mean_c, m), both=False)
        pos = np.zeros(256, np.int64)
        neg = np.zeros(256, np.int64)
        for i in idx:  # own colour: reference = mean colour of the class's pixels in that image
            fi = feats[i][:, :3].astype(np.float32)
            mi = labs[i] == c
            p_, n_ = _dist_hist(fi, fi[mi].mean(0), mi)
            pos += p_
            neg += n_
        res["own_colour"] = _best_threshold_iou(pos, neg, both=False)
        per_class[c] = res
    keys = ("channel", "mean_colour", "channel_in_class_images", "mean_colour_in_class_images", "own_colour")
    summary = {k: {"mean": float(np.mean([r[k] for r in per_class.values()])),
                   "max": float(np.max([r[k] for r in per_class.values()]))} for k in keys}
    return {"split": split, "images": len(lines), "channels": names, "summary": summary,
            "per_class": per_class}


# --------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsseg-synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (PASCAL VOC layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=SynthParams.n_train, help="number of train images")
    ap.add_argument("--val", type=int, default=SynthParams.n_val, help="number of val images")
    ap.add_argument("--size", type=int, default=SynthParams.size, help="longer image side in pixels")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes (the output does not depend on it)")
    ap.add_argument("--force", action="store_true", help="replace a benchmark made with other parameters")
    ap.add_argument("--latent-share", type=float, default=None, metavar="S",
                    help="the bias dial: share of a fold's base-class training images that hold one of its novel "
                         "classes (default: the generator's own, ~0.19; allowed: that to 1). Training images only; "
                         "write each setting to its own directory (e.g. data/synth_latent40)")
    ap.add_argument("--latent-count", type=int, default=1, metavar="N",
                    help=f"latent objects added per (image, fold) that receives them (1..{LATENT_COUNT_MAX}; default 1)")
    ap.add_argument("--latent-size", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="diameter of the added objects as a fraction of the image side, uniform in [LO, HI] "
                         f"(within {list(LATENT_EXTENT_RANGE)}; default: the size distribution of every object)")
    a = ap.parse_args(argv)
    short_min = max(1, round(a.size * SynthParams.short_min / SynthParams.size))
    min_px = max(32, round(SynthParams.recommended_min_pixels * (a.size / SynthParams.size) ** 2))
    try:
        params = SynthParams(seed=a.seed, n_train=a.train, n_val=a.val, size=a.size, short_min=short_min,
                             recommended_min_pixels=min_px, latent_share=a.latent_share,
                             latent_count=a.latent_count,
                             latent_extent=None if a.latent_size is None else tuple(a.latent_size))
        params.validate()
        if params.latent_share is not None and Path(a.out).resolve().name == "synth":
            raise ConfigError(f"--out {a.out}: a --latent-share benchmark goes to its own directory (e.g. "
                              f"{Path(a.out).parent / latent_dirname(params.latent_share)}), never the default's")
        res = generate(a.out, params, workers=a.workers, force=a.force)
    except ConfigError as e:
        print(f"fsseg-synth: error: {e}", file=sys.stderr)
        return 2
    if res["status"] == "generated":
        meta = res["meta"]
        nov = meta["novel_in_train"]
        frac = ", ".join(f"fold{f} {nov[str(f)]['frac_novel_objects_in_base_images']:.2f}"
                         for f in range(NUM_FOLDS))
        st = meta["stats"]
        print(f"fsseg-synth: wrote {a.out}: {params.n_train} train / {params.n_val} val images "
              f"({st['train']['objects']} / {st['val']['objects']} objects), seed {params.seed}, "
              f"{_dir_size(Path(a.out)) / 2**20:.1f} MiB in {res['seconds']:.1f} s "
              f"with {a.workers} worker(s)")
        print(f"fsseg-synth: novel objects inside base-class training images: {frac}")
        share = ", ".join(f"fold{f} {nov[str(f)]['frac_base_images_with_novel']:.3f}" for f in range(NUM_FOLDS))
        print(f"fsseg-synth: base-class training images holding a novel object (the --latent-share measure): {share}"
              + ("" if params.latent_share is None else f" (asked {params.latent_share}, rate {latent_rate(params):.3f})"))
        qual = min(c["images_ge_min_pixels"] for c in st["val"]["per_class"])
        print(f"fsseg-synth: recommended min_pixels {params.recommended_min_pixels}; "
              f"fewest val images per class at that size: {qual}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
