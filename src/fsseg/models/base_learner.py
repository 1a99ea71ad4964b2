"""Stage 1 of BAM-based methods: a PSPNet base learner trained on a fold's base classes, not episodically.

    fsseg-train task=base method=bam recipe=bam_synth data.fold=0        # writes the fold's base learner

BAM (round2-references.md §1.1) trains PSPNet on *every* training image, labels remapped base class -> its
index in the fold's base list + 1, every other class -> 0, 255 kept; it fine-tunes the whole backbone with
BatchNorm in training mode (encoder lr 2.5e-4, PPM and classifier x10), crop 417, scale [0.5, 2.0], and
selects on base-class mIoU of the validation images. I2R keeps the encoder frozen instead (its ImageNet head
must stay valid for CAMs): both are configs of this one task (``encoder.frozen``, ``encoder.bn``).

The run's best weights are exported (atomically) to ``export_path``, with what they were trained for (dataset,
fold, encoder, taps, base classes); stage 2 loads them with `load_base_learner`, which refuses a file made for
another fold, class list or encoder, and names the command that trains the missing one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchmetrics import Metric

from fsseg.data import batch as B
from fsseg.data.episodes import base_label, seed_worker
from fsseg.data.folds import pixel_table
from fsseg.data.sources import Source
from fsseg.data.transforms import EvalTransform, TrainTransform
from fsseg.errors import ConfigError
from fsseg.models.bam import BaseLearner
from fsseg.models.ops import upsample_logits
from fsseg.runs import limited_training

log = logging.getLogger(__name__)

__all__ = [
    "BaseClassData", "BaseClassIoU", "BaseLearnerModule", "load_base_learner", "load_domain_classifier", "write_artifact",
]  # fmt: skip

FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# Data: every image of a split, labels as base-class indices
# ----------------------------------------------------------------------------------------------------------
def base_index_lut(base_ids: Sequence[int], ignore_index: int = B.IGNORE_INDEX) -> np.ndarray:
    """Dataset class id -> base-learner channel (base class i -> i + 1, others 0, ignore -> 255)."""
    lut = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(base_ids):
        lut[int(c)] = i + 1
    lut[ignore_index] = B.IGNORE_INDEX
    return lut


class _BaseImages(Dataset):
    def __init__(self, source: Source, split: str, base_ids: Sequence[int], transform: Any, seed: int, train: bool):
        self.source, self.split, self.transform, self.seed, self.train = source, split, transform, seed, train
        self.base_ids = [int(c) for c in base_ids]
        self.lut = base_index_lut(self.base_ids)
        self.n = len(source.items(split))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, code: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(int(code), self.n)  # training codes carry the epoch (`_EpochShuffle`)
        img, label = self.source.load(self.split, i)
        target = self.lut[base_label(label, self.base_ids, self.source.ignore_index).astype(np.int64).clip(0, 255)]
        if self.train:  # augmentation drawn from (seed, epoch, image): a resumed run sees the same crops
            rng = np.random.default_rng([self.seed, epoch, i])
            image, (mask,) = self.transform(img, [target], rng)
        else:
            image, (mask,), _ = self.transform(img, [target])
        return {B.QUERY_IMG: image, B.QUERY_MASK: mask.long()}


class _EpochShuffle(Sampler[int]):
    """Seeded permutation per epoch (Lightning calls ``set_epoch``); yields ``epoch * n + image`` codes so
    the dataset draws each image's augmentation from (seed, epoch, image) in any worker."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter((self.epoch * self.n + order).tolist())


@dataclass(frozen=True)
class ImageListManifest:
    """What a base-class evaluation ran on (the provenance record's ``manifest``): the split's image list."""

    hash: str
    path: str
    episodes: tuple[str, ...]  # the evaluation images, in order


_EPISODE_ONLY = {
    "shots", "min_pixels", "train_filter", "eval_classes", "eval_queries", "eval_episodes", "eval_seed",
    "val_episodes", "train_episodes_per_epoch", "feature_cache",
}  # fmt: skip


class BaseClassData(L.LightningDataModule):
    """Every image of ``train_split`` (training) and ``eval_split`` (validation and test), base-class labels."""

    def __init__(
        self,
        source: Source,
        fold: int,
        train_size: int = 417,
        eval_size: int = 473,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        scale_range: Sequence[float] = (0.5, 2.0),
        rotate_deg: float = 10.0,
        blur_p: float = 0.5,
        hflip_p: float = 0.5,
        train_split: str = "train",
        eval_split: str = "val",
        batch_size: int = 12,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str = "outputs/cache",
        seed: int = 0,
        **episode_options: Any,
    ) -> None:
        super().__init__()
        # the episodic data config is reused as is (task=base): its episode-only keys do not apply here
        unknown = sorted(set(episode_options) - _EPISODE_ONLY)
        if unknown:
            raise ConfigError(f"BaseClassData: unknown data option(s) {unknown}")
        source.check_fold(fold)
        if batch_size < 1 or eval_batch_size < 1:
            raise ConfigError(f"data.batch_size and data.eval_batch_size must be >= 1; got {batch_size}, {eval_batch_size}")
        self.source, self.fold = source, int(fold)
        self.base_ids, self.novel_ids = (list(x) for x in source.fold_classes(fold))
        self.train_split, self.eval_split = train_split, eval_split
        self.train_tf = TrainTransform(train_size, mean, std, scale_range, rotate_deg, blur_p, hflip_p)
        self.eval_tf = EvalTransform(eval_size, mean, std)
        self.batch_size, self.eval_batch_size, self.num_workers = int(batch_size), int(eval_batch_size), int(num_workers)
        self.cache_dir, self.seed = Path(cache_dir), int(seed)

    def prepare_data(self) -> None:
        self.source.prepare([self.train_split, self.eval_split])
        for split in (self.train_split, self.eval_split):  # verifies every label file before training starts
            pixel_table(self.source, split, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = _BaseImages(self.source, self.train_split, self.base_ids, self.train_tf, self.seed, True)
        self.eval_set = _BaseImages(self.source, self.eval_split, self.base_ids, self.eval_tf, self.seed, False)
        names = self.source.item_names(self.eval_split)
        digest = hashlib.sha256(json.dumps([self.source.name, self.eval_split, names]).encode()).hexdigest()
        self.eval_manifest = ImageListManifest(digest, f"{self.source.root}:{self.eval_split}", tuple(names))

    def model_args(self) -> dict[str, Any]:
        """What the model needs from the data: the fold's base classes in channel order."""
        return {"base_class_ids": self.base_ids, "fold": self.fold, "dataset": self.source.name}

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=self.num_workers,
            worker_init_fn=functools.partial(seed_worker, self.seed),
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        sampler = _EpochShuffle(len(self.train_set), self.seed)
        return self._loader(self.train_set, self.batch_size, sampler, len(self.train_set) > self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, self.eval_batch_size, None, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ----------------------------------------------------------------------------------------------------------
# Metric and module
# ----------------------------------------------------------------------------------------------------------
class BaseClassIoU(Metric):
    """Semantic-segmentation IoU over 1 + C classes from a summed confusion matrix (exact under DDP).

    ``miou``: mean IoU of the base classes 1..C that occur (label or prediction); ``miou_bg``: with background.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.add_state("confusion", torch.zeros(self.num_classes, self.num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.argmax(dim=1)
        valid = target != B.IGNORE_INDEX
        idx = target[valid] * self.num_classes + pred[valid]
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view(self.num_classes, -1)
        self.images += target.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        cm = self.confusion.double()
        inter, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
        iou = inter / union.clamp(min=1)
        seen = union > 0
        return {
            "miou": iou[1:][seen[1:]].mean() if seen[1:].any() else iou.new_zeros(()),
            "miou_bg": iou[seen].mean() if seen.any() else iou.new_zeros(()),
            "class_iou": torch.where(seen, iou, torch.full_like(iou, float("nan")))[1:],
            "episodes": self.images.double(),
        }


class BaseLearnerModule(L.LightningModule):
    """Encoder + `BaseLearner`, cross-entropy on base-class labels, SGD with the head at ``head_lr_multiplier``.

    Args:
        encoder: a FrozenEncoder (BAM: ``frozen: false, bn: train``; I2R: frozen).
        base_class_ids, fold, dataset: from the data (`BaseClassData.model_args`).
        tap: the encoder tap the head reads (the deepest feature).
        export_path: where the best weights go after testing (stage 2 reads them).
        base_lr, head_lr_multiplier, momentum, weight_decay, poly_power: BAM's stage-1 recipe (2.5e-4, x10, 0.9,
            1e-4, 0.9).
        ppm_lr_multiplier: the PPM's own multiplier; None = head_lr_multiplier (BAM: PPM and classifier x10).
            I2R's stage-1 optimizer lists only [ppm, cls] with index_split 0 on PASCAL, so its PPM runs at x1.
    """

    def __init__(
        self,
        encoder: nn.Module,
        base_class_ids: Sequence[int],
        fold: int,
        dataset: str,
        tap: str = "base",
        export_path: str | None = None,
        base_lr: float = 2.5e-4,
        head_lr_multiplier: float = 10.0,
        ppm_lr_multiplier: float | None = None,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        poly_power: float = 0.9,
        bins: Sequence[int] = (1, 2, 3, 6),
        domain_tap: str | None = None,
        domain_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not (np.isfinite(base_lr) and base_lr > 0) or not (np.isfinite(head_lr_multiplier) and head_lr_multiplier > 0):
            raise ConfigError(f"model.base_lr and model.head_lr_multiplier must be finite and > 0; got {base_lr}, {head_lr_multiplier}")
        if ppm_lr_multiplier is not None and not (np.isfinite(ppm_lr_multiplier) and ppm_lr_multiplier > 0):
            raise ConfigError(f"base_task.ppm_lr_multiplier must be null or finite and > 0; got {ppm_lr_multiplier}")
        self.ppm_lr_multiplier = None if ppm_lr_multiplier is None else float(ppm_lr_multiplier)
        channels = dict(getattr(encoder, "tap_channels", {}))
        if tap not in channels:
            raise ConfigError(f"the base learner reads encoder tap {tap!r}; encoder.taps has {sorted(channels)}")
        self.encoder, self.tap = encoder, tap
        self.head = BaseLearner(channels[tap], len(base_class_ids), base_class_ids, bins=bins)
        # I2R's "domain-specific classification head" (its limitation section): an image-level base-class
        # classifier on GAP of one tap (classic CAM form), trained beside the base learner; stage 2 may take its
        # CAMs instead of the ImageNet head's (head.classifier, `load_domain_classifier`)
        self.domain_tap = domain_tap
        self.domain: nn.Linear | None = None
        if domain_tap is not None:
            if domain_tap not in channels:
                raise ConfigError(f"base_task.domain_tap {domain_tap!r} is not an encoder tap ({sorted(channels)})")
            if not domain_weight > 0:
                raise ConfigError(f"base_task.domain_weight must be > 0; got {domain_weight}")
            self.domain = nn.Linear(channels[domain_tap], len(base_class_ids))
        self.domain_weight = float(domain_weight)
        self.fold, self.dataset = int(fold), str(dataset)
        self.export_path = export_path
        self.base_lr, self.head_lr_multiplier = float(base_lr), float(head_lr_multiplier)
        self.momentum, self.weight_decay, self.poly_power = momentum, weight_decay, poly_power
        self.val_iou = BaseClassIoU(1 + len(base_class_ids))
        self.test_iou = BaseClassIoU(1 + len(base_class_ids))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images)[self.tap])

    def _domain_terms(self, taps: Mapping[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-label BCE of the domain classifier against the base classes present in each label, and whether
        each image's top class is present (B,)."""
        c = self.domain.out_features
        present = torch.zeros(target.shape[0], c + 1, device=target.device)
        present.scatter_(1, torch.where(target == B.IGNORE_INDEX, 0, target).flatten(1), 1.0)
        present = present[:, 1:]
        logits = self.domain(taps[self.domain_tap].mean(dim=(2, 3)))
        hit = present.gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
        return F.binary_cross_entropy_with_logits(logits, present), hit

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        target = batch[B.QUERY_MASK]
        taps = self.encoder(batch[B.QUERY_IMG])
        logits = upsample_logits(self.head(taps[self.tap]), target.shape[-2:])
        loss = F.cross_entropy(logits, target, ignore_index=B.IGNORE_INDEX)
        if self.domain is not None:
            domain_loss, _ = self._domain_terms(taps, target)
            self.log("train/domain_loss", domain_loss, batch_size=target.shape[0])
            loss = loss + self.domain_weight * domain_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=target.shape[0])
        return loss

    def _eval(self, batch: Mapping[str, torch.Tensor], metric: BaseClassIoU) -> None:
        target = batch[B.QUERY_MASK]
        taps = self.encoder(batch[B.QUERY_IMG])
        metric.update(upsample_logits(self.head(taps[self.tap]), target.shape[-2:]), target)
        if self.domain is not None:  # share of images whose top domain class is present in them
            _, hit = self._domain_terms(taps, target)
            split = "val" if metric is self.val_iou else "test"
            self.log(f"{split}/domain_top1", hit.mean(), batch_size=target.shape[0], on_epoch=True, on_step=False)

    def validation_step(self, batch, batch_idx):
        self._eval(batch, self.val_iou)

    def test_step(self, batch, batch_idx):
        self._eval(batch, self.test_iou)

    def _log_metric(self, split: str, metric: BaseClassIoU) -> None:
        values = metric.compute()
        for key in ("miou", "miou_bg", "episodes"):
            self.log(f"{split}/{key}", float(values[key]), prog_bar=key == "miou")
        for i, v in enumerate(values["class_iou"].tolist()):
            self.log(f"{split}/class_iou/{i}", float(v))
        metric.reset()

    def on_validation_epoch_end(self):
        self._log_metric("val", self.val_iou)

    def on_test_epoch_end(self):
        self._log_metric("test", self.test_iou)
        if self.export_path and self.trainer.is_global_zero:
            self.export(self.export_path)

    def configure_optimizers(self):
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        head = list(self.head.parameters()) + (list(self.domain.parameters()) if self.domain is not None else [])
        groups = ([{"params": enc, "lr": self.base_lr}] if enc else []) + [
            {"params": head, "lr": self.base_lr * self.head_lr_multiplier}
        ]
        if self.ppm_lr_multiplier is not None:  # the PPM apart (I2R's stage 1)
            ppm = {id(p) for p in self.head.ppm.parameters()}
            groups[-1]["params"] = [p for p in head if id(p) not in ppm]
            groups.append({"params": list(self.head.ppm.parameters()), "lr": self.base_lr * self.ppm_lr_multiplier})
        opt = torch.optim.SGD(groups, lr=self.base_lr, momentum=self.momentum, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1.0 - step / total) ** self.poly_power)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.train(mode)  # a frozen encoder keeps itself in eval (its own override)
        return self

    # -- the artifact stage 2 reads ----------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        enc = self.encoder
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "fold": self.fold,
            "encoder": getattr(enc, "name", type(enc).__name__),
            "taps": {k: list(v) for k, v in getattr(enc, "taps", {}).items()},
            "tap": self.tap,
            "in_dim": self.head.in_dim,
            "base_class_ids": [int(c) for c in self.head.base_class_ids.tolist()],
            "bins": list(self.head.ppm.bins),
            "domain_tap": self.domain_tap,
            **({"trained": self.trained_budget()} if self._trainer is not None else {}),
        }

    def trained_budget(self) -> dict[str, Any]:
        """What the exported weights were trained with: prerequisites=auto re-trains a file from a smoke run
        (fast_dev_run, limit_train_batches) when a full run asks for it."""
        t = self.trainer
        lim = t.limit_train_batches
        return {"global_step": int(t.global_step), "epochs": int(t.current_epoch),
                "limit_train_batches": lim if isinstance(lim, int) else float(lim), "fast_dev_run": bool(t.fast_dev_run)}  # fmt: skip

    def export(self, path: str | os.PathLike) -> Path:
        """Write {state_dict: encoder.* + head.* (+ domain.*), meta} to ``path`` atomically (temp file + rename)."""
        state = {
            k: v.detach().cpu() for k, v in self.state_dict().items() if k.startswith(("encoder.", "head.", "domain."))
        }
        return write_artifact(path, state, self.meta())


def write_artifact(path: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """A stage-1 file: ``{"state_dict": state, "meta": meta}``, written to a temporary name and renamed."""
    from fsseg.io import write_atomic

    buf = io.BytesIO()
    torch.save({"state_dict": dict(state), "meta": dict(meta)}, buf)
    return write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Stage 2: load the frozen base learner, refusing one made for something else
# ----------------------------------------------------------------------------------------------------------
def load_base_learner(
    path: str | os.PathLike,
    fold: int,
    encoder: str,
    base_class_ids: Sequence[int] | None = None,
    dataset: str | None = None,
    tap: str | None = None,
    train_command: str = "fsseg-train task=base ...",
) -> BaseLearner:
    """The stage-1 `BaseLearner` at ``path``; ConfigError when absent or trained for another fold, class list,
    dataset or encoder (each mismatch named with what was expected)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"no base learner at {path} (stage 1 for fold {fold}, encoder {encoder!r}). Train it first: "
            f"{train_command}"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = blob["meta"], blob["state_dict"]
    except Exception as err:
        raise ConfigError(f"{path} is not a base-learner file written by fsseg-train task=base ({type(err).__name__}: {err})") from err
    expected = {"fold": int(fold), "encoder": encoder}
    if dataset is not None:
        expected["dataset"] = dataset
    if base_class_ids is not None:
        expected["base_class_ids"] = [int(c) for c in base_class_ids]
    if tap is not None:
        expected["tap"] = tap
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        detail = "; ".join(f"{k}: file has {got!r}, expected {want!r}" for k, (got, want) in wrong.items())
        raise ConfigError(f"base learner {path} was trained for something else ({detail}). Train the right one: {train_command}")
    trained = meta.get("trained") or {}
    if limited_training(trained.get("limit_train_batches"), trained.get("fast_dev_run")):
        log.warning("base learner %s comes from a smoke run (%s): fine for a test, not for a result; %s", path,
                    ", ".join(f"{k}={v}" for k, v in trained.items()), train_command)  # fmt: skip
    learner = BaseLearner(meta["in_dim"], len(meta["base_class_ids"]), meta["base_class_ids"], bins=meta["bins"])
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    learner.load_state_dict(head, strict=True)
    return learner.eval()


def load_domain_classifier(
    path: str | os.PathLike, fold: int, encoder: str, tap: str, train_command: str = "fsseg-train task=base ..."
) -> nn.Linear:
    """The stage-1 file's domain classifier (base classes from GAP of encoder tap ``tap``), frozen; ConfigError when
    the file has none, or one for another fold, encoder or tap."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta, state = blob["meta"], blob["state_dict"]
    except Exception as err:
        raise ConfigError(f"{path} is not a stage-1 file written by fsseg-train task=base ({type(err).__name__}: {err})") from err
    have = {"fold": meta.get("fold"), "encoder": meta.get("encoder"), "domain_tap": meta.get("domain_tap")}
    want = {"fold": int(fold), "encoder": encoder, "domain_tap": tap}
    if have != want:
        detail = "; ".join(f"{k}: file has {have[k]!r}, expected {want[k]!r}" for k in want if have[k] != want[k])
        raise ConfigError(
            f"stage-1 file {path} has no domain classifier for this run ({detail}). Train stage 1 with "
            f"base_task.domain_tap={tap}: {train_command}"
        )
    weight, bias = state["domain.weight"], state["domain.bias"]
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    linear.load_state_dict({"weight": weight, "bias": bias})
    return linear.requires_grad_(False).eval()
