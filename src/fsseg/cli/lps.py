"""fsseg-lps: where CELP's latent pseudo-masks land (Eqs. 1-4) on a dataset's training images.

CELP's premise: an unlabelled region that many unlabelled pixels resemble (Eq. 3's anchor and its similar region,
Eq. 4) is a latent object - typically a novel class that training relabels as background. With a frozen encoder
the pseudo-foreground M^1 does not depend on training, so it can be audited against the full label map, which
still names the novel classes:

    fsseg-lps experiment=celp_effl0_synth data.fold=0 --images 200
    fsseg-lps method=celp encoder=resnet50 recipe=celp_pascal data.fold=0 paths.data_dir=/data --deltas 0.5 0.65

Images: the training split's query candidates (the data layer's fold index: ``data.min_pixels`` pixels of a base
class, ``data.train_filter``), in a seeded random order, resized by the evaluation transform to ``data.train_size`` (no
augmentation). M^1 is sampled as ``fsseg.models.celp`` samples it in training (same functions, the method's
``sigma``, ``label_threshold`` and encoder tap; one seeded anchor per image). Per delta it reports:

- anchored: images with a candidate (Eq. 3), and the mean size of M^1 in feature pixels;
- precision: the share of M^1's pixels on novel-class objects, against **chance**, that share among all unlabelled
  pixels (what M^1 would score if it fell anywhere); lift = precision / chance;
- recall: of the images whose unlabelled pixels include a novel object, how many M^1 touches, and the mean IoU
  of M^1 with the novel pixels (an image without an anchor scores 0).

A feature pixel counts as novel when at least half its bilinear footprint is a novel class.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fsseg.cli.common import config_dir, environment_defaults
from fsseg.data.batch import IGNORE_INDEX
from fsseg.data.folds import build_fold_index
from fsseg.data.sources import atomic_write_text, read_image, read_label_png
from fsseg.data.transforms import EvalTransform
from fsseg.errors import ConfigError
from fsseg.models.celp import label_regions, sample_latent_regions, unlabelled_at
from fsseg.models.ops import mask_to_feature

DELTAS = (0.4, 0.5, 0.65, 0.8)  # CELP Table 5


def overlap_counts(
    foreground: torch.Tensor, novel: torch.Tensor, unlabelled: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image counts (B,) for boolean (B, N) maps: M^1, novel-class pixels, unlabelled pixels."""
    hidden = novel & unlabelled
    return {
        "fg": foreground.sum(1),
        "fg_novel": (foreground & hidden).sum(1),
        "unlabelled": unlabelled.sum(1),
        "unlabelled_novel": hidden.sum(1),
        "union": (foreground | hidden).sum(1),
    }


def summarise(counts: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """The report's figures from per-image counts (each (n_images,)) and anchored flags (n_images,) bool."""
    c = {k: v.double() for k, v in counts.items()}
    precision = float(c["fg_novel"].sum() / c["fg"].sum().clamp_min(1))
    chance = float(c["unlabelled_novel"].sum() / c["unlabelled"].sum().clamp_min(1))
    with_novel = c["unlabelled_novel"] > 0
    iou = c["fg_novel"][with_novel] / c["union"][with_novel].clamp_min(1)
    return {
        "images": int(keep.numel()),
        "anchored": int(keep.sum()),
        "fg_pixels": float(c["fg"][keep].mean()) if keep.any() else 0.0,
        "precision": precision,
        "chance": chance,
        "lift": precision / chance if chance > 0 else float("nan"),
        "images_with_novel": int(with_novel.sum()),
        "touched": int((c["fg_novel"][with_novel] > 0).sum()),
        "mean_iou": float(iou.mean()) if iou.numel() else float("nan"),
    }


def audit(cfg, deltas, images: int, batch: int, seed: int) -> dict:
    for d in deltas:
        if not -1.0 < d < 1.0:
            raise ConfigError(f"--deltas: every delta must be in (-1, 1); got {d!r}")
    if images < 1 or batch < 1:
        raise ConfigError(f"--images and --batch must be >= 1; got {images}, {batch}")
    lc = OmegaConf.select(cfg, "aux.latent_contrast")
    sigma = int(lc.sigma) if lc is not None else 11
    label_threshold = float(lc.label_threshold) if lc is not None else 0.25
    tap = str(lc.high_tap) if lc is not None else "high"
    source = instantiate(cfg.data.source)
    fold = int(cfg.data.fold)
    base, novel = source.fold_classes(fold)
    index = build_fold_index(source, "train", fold, min_pixels=int(cfg.data.min_pixels),
                             train_filter=str(cfg.data.train_filter), cache_dir=cfg.data.cache_dir, progress=False)  # fmt: skip
    if not index.items:
        raise ConfigError(f"no training image of {source.root} holds {cfg.data.min_pixels} pixels of a base class")
    items = source.items("train")
    order = np.random.default_rng(seed).permutation(index.items)[:images]  # training's query candidates
    queries = [items[i] for i in order]
    encoder = instantiate(cfg.encoder).eval()
    transform = EvalTransform(int(cfg.data.train_size), cfg.encoder.mean, cfg.encoder.std)
    gen = torch.Generator().manual_seed(seed)
    per_delta = {d: {"keep": []} for d in deltas}
    base_t, novel_t = torch.tensor(list(base)), torch.tensor(list(novel))
    for start in range(0, len(queries), batch):
        imgs, labels = [], []
        for img_path, label_path in queries[start : start + batch]:  # file reading; the sampling is batched
            img, (label,), _ = transform(read_image(img_path), [read_label_png(label_path, img_path)])
            imgs.append(img)
            labels.append(label.long())
        label = torch.stack(labels)
        with torch.no_grad():
            high = encoder(torch.stack(imgs))[tap].float()
        size = tuple(high.shape[-2:])
        keep_ids = torch.isin(label, base_t) | (label == IGNORE_INDEX)
        base_label = torch.where(keep_ids, label, torch.zeros_like(label))
        # training's M_q: every base-class pixel (the target class is one of them)
        labelled, ignored = label_regions(torch.zeros_like(label), base_label)
        unlabelled = unlabelled_at(labelled | ignored, size, label_threshold)
        is_novel = (mask_to_feature(torch.isin(label, novel_t).float(), size) >= 0.5).flatten(1)
        for d in deltas:
            uniforms = torch.rand(label.shape[0], generator=gen)
            sample = sample_latent_regions(high, unlabelled, d, sigma, uniforms)
            acc = per_delta[d]
            acc["keep"].append(sample.keep)
            for k, v in overlap_counts(sample.foreground, is_novel, unlabelled).items():
                acc.setdefault(k, []).append(v)
    report = {
        "fold": fold,
        "source": str(source.root),
        "novel_classes": list(novel),
        "sigma": sigma,
        "tap": tap,
        "seed": seed,
        "deltas": {},
    }
    for d, acc in per_delta.items():
        keep = torch.cat(acc.pop("keep"))
        report["deltas"][str(d)] = summarise({k: torch.cat(v) for k, v in acc.items()}, keep)
    return report


def format_report(report: dict) -> str:
    lines = [
        (f"fold {report['fold']} of {report['source']}: novel classes {report['novel_classes']}, sigma {report['sigma']}, "
        f"tap {report['tap']}"),
        ("| delta | anchored | M^1 size (feature px) | precision on novel | chance | lift | images with a novel object "
        "| touched | mean IoU |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d, r in report["deltas"].items():
        lines.append(
            f"| {d} | {r['anchored']}/{r['images']} | {r['fg_pixels']:.1f} | {100 * r['precision']:.1f}% "
            f"| {100 * r['chance']:.1f}% | {r['lift']:.2f} | {r['images_with_novel']} | {r['touched']} "
            f"| {100 * r['mean_iou']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    environment_defaults()
    ap = argparse.ArgumentParser(
        prog="fsseg-lps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default experiment: celp_effl0_synth)")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--deltas", type=float, nargs="+", default=list(DELTAS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)
    from hydra import compose, initialize_config_dir

    named = any(o.startswith(("experiment=", "recipe=")) for o in args.overrides)
    overrides = args.overrides if named else ["experiment=celp_effl0_synth", *args.overrides]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    report = audit(cfg, args.deltas, args.images, args.batch, args.seed)
    print(format_report(report))
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
