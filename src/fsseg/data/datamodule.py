"""``EpisodeDataModule``: one fold of a few-shot benchmark as Lightning dataloaders.

    datamodule = EpisodeDataModule(PascalVOC("data/VOCdevkit/VOC2012"), fold=0, shots=1, train_size=473,
                                   eval_size=473, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    datamodule.prepare_data(); datamodule.setup("fit")

- ``prepare_data()`` (no instance state): builds derived files (PASCAL lists, COCO masks) and the per-split
  class-pixel tables of the training and evaluation splits, verifying every file on the way (see
  :mod:`fsseg.data.folds`). Bad input raises DataError here, before any training.
- ``setup(stage)``: fold indexes, the training episode dataset (stage fit), and two manifests of the
  evaluation split ``eval_split``: the test manifest (``eval_episodes`` episodes, seed ``eval_seed``;
  ``eval_manifest``) and the validation manifest used during training (``val_episodes`` episodes, seed
  ``eval_seed + 1``).
  ``eval_queries`` (``all``, ``with_base``, ``without_base``): only queries that hold a qualifying base class,
  or none; for the background-bias diagnostic (``fsseg-bias``). On the training split (allowed only with a
  subset) under ``train_filter="keep"``, ``with_base`` queries are the images training used, their novel pixels
  labelled background, and ``without_base`` images training never used; on the evaluation split the same
  partition measures how much harder the with-base images are without any training on them.
  Like the reference implementations, there is no separate held-out validation split: validation episodes
  come from the evaluation split (other seed, usually fewer episodes), so model selection on them sees the
  test images. Manifests are saved under ``cache_dir/manifests`` and reused (hash verified).
- ``feature_cache`` (default None: off): train on cached frozen features of V pre-augmented views per
  training image (:mod:`fsseg.data.feature_cache`). The cache needs the model's encoder: ``prepare_feature_cache
  (model)`` builds or opens it and swaps the training dataset for ``CachedTrainEpisodes``;
  ``train_dataloader()`` calls it with the trainer's model when nobody did. Validation and test never use it.
- Dataloaders: train (``EpisodeSampler``: seeded shuffle, one episode per qualifying training image per epoch
  unless ``train_episodes_per_epoch``; ``drop_last`` when the epoch holds more than one batch), val and test
  (manifest order, no shuffle). All use ``collate_episodes``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from fsseg.data import feature_cache as fc
from fsseg.data.episodes import (
    CachedTrainEpisodes,
    EpisodeSampler,
    EvalEpisodes,
    ShardedEvalSampler,
    TrainEpisodes,
    collate_episodes,
    seed_worker,
)
from fsseg.data.folds import TRAIN_FILTERS, FoldIndex, build_fold_index, pixel_table
from fsseg.data.manifest import EpisodeManifest
from fsseg.data.sources import Source
from fsseg.data.transforms import EvalTransform, TrainTransform
from fsseg.errors import ConfigError, DataError
from fsseg.io import stable_key

log = logging.getLogger(__name__)

EVAL_QUERIES = ("all", "with_base", "without_base")


class EpisodeDataModule(L.LightningDataModule):
    """Episodes of one fold of a dataset (see the module docstring)."""

    def __init__(
        self,
        source: Source,
        fold: int,
        shots: int,
        train_size: int,
        eval_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale_range: Sequence[float] = (0.9, 1.1),
        rotate_deg: float = 10.0,
        blur_p: float = 0.5,
        hflip_p: float = 0.5,
        min_pixels: int = 2048,
        train_filter: str = "keep",
        eval_split: str = "val",
        eval_classes: str = "novel",
        eval_queries: str = "all",
        eval_episodes: int = 1000,
        eval_seed: int = 321,
        val_episodes: int = 200,
        train_episodes_per_epoch: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str = "outputs/cache",
        seed: int = 0,
        rotate_p: float = 0.5,
        eval_size_divisor: int = 8,
        feature_cache: dict | None = None,
    ) -> None:
        super().__init__()
        for attr in ("num_folds", "splits", "fold_classes", "items", "load"):
            if not hasattr(source, attr):
                raise ConfigError(
                    f"source={source!r} is not a dataset reader (no {attr!r}); expected fsseg.data.sources.*"
                )
        self.source = source

        def positive(name: str, value, minimum: int = 1) -> int:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or int(value) != value or value < minimum:
                raise ConfigError(f"data.{name}={value!r}: expected an integer >= {minimum}")
            return int(value)

        self.fold = positive("fold", fold, 0)
        if self.fold >= source.num_folds:
            raise ConfigError(
                f"data.fold={fold!r} is out of range: {type(source).__name__} has folds "
                f"0..{source.num_folds - 1}"
            )
        self.shots = positive("shots", shots)
        self.train_size = positive("train_size", train_size)
        self.eval_size = positive("eval_size", eval_size)
        self.min_pixels = positive("min_pixels", min_pixels, 0)
        self.eval_episodes = positive("eval_episodes", eval_episodes)
        self.val_episodes = positive("val_episodes", val_episodes)
        self.batch_size = positive("batch_size", batch_size)
        self.eval_batch_size = positive("eval_batch_size", eval_batch_size)
        self.num_workers = positive("num_workers", num_workers, 0)
        self.eval_seed = positive("eval_seed", eval_seed, 0)
        self.seed = positive("seed", seed, 0)
        self.train_episodes_per_epoch = None
        if train_episodes_per_epoch is not None:
            self.train_episodes_per_epoch = positive("train_episodes_per_epoch", train_episodes_per_epoch)
        if train_filter not in TRAIN_FILTERS:
            raise ConfigError(f"data.train_filter={train_filter!r}: expected one of {list(TRAIN_FILTERS)}")
        self.train_filter = train_filter
        if eval_classes not in ("novel", "base"):
            raise ConfigError(f"data.eval_classes={eval_classes!r}: expected 'novel' or 'base'")
        self.eval_classes = eval_classes
        if eval_queries not in EVAL_QUERIES:
            raise ConfigError(f"data.eval_queries={eval_queries!r}: expected one of {list(EVAL_QUERIES)}")
        if eval_split not in source.splits or (eval_split == "train" and eval_queries == "all"):
            allowed = [s for s in source.splits if s != "train"]
            raise ConfigError(
                f"data.eval_split={eval_split!r}: expected one of {allowed} for {type(source).__name__} (the "
                f"training split only with data.eval_queries=with_base|without_base, the background-bias "
                f"diagnostic; got {eval_queries!r})"
            )
        if eval_queries != "all" and eval_classes != "novel":
            raise ConfigError(f"data.eval_queries={eval_queries!r} needs data.eval_classes='novel'")
        self.eval_split, self.eval_queries = eval_split, eval_queries
        scale_range = tuple(float(v) for v in scale_range)
        if len(scale_range) != 2:
            raise ConfigError(f"data.scale_range={list(scale_range)}: expected [low, high]")
        self.cache_dir = Path(cache_dir)
        # The transforms validate their own arguments (ConfigError naming them).
        self.train_transform = TrainTransform(
            self.train_size, mean, std, scale_range=scale_range, rotate_deg=rotate_deg, blur_p=blur_p,
            hflip_p=hflip_p, rotate_p=rotate_p,
        )  # fmt: skip
        self.eval_transform = EvalTransform(self.eval_size, mean, std, size_divisor=eval_size_divisor)
        self.feature_cache_cfg = fc.parse_config(feature_cache)
        self.feature_cache: fc.FeatureCache | None = None
        self.train_index: FoldIndex | None = None
        self.eval_index: FoldIndex | None = None
        self.train_dataset: TrainEpisodes | None = None
        self.val_dataset: EvalEpisodes | None = None
        self.test_dataset: EvalEpisodes | None = None
        self._eval_manifest: EpisodeManifest | None = None
        self._val_manifest: EpisodeManifest | None = None

    # ------------------------------------------------------------------------------------------ preparation
    def model_args(self) -> dict:
        """What the model is built with from the data (fsseg-train passes it to the model's constructor)."""
        return {"num_eval_classes": self.num_novel_classes, "base_class_ids": list(self.source.fold_classes(self.fold)[0])}

    def prepare_data(self) -> None:
        """Build derived files and class-pixel tables, verifying every file (no instance state is set)."""
        splits = list(dict.fromkeys(["train", self.eval_split]))
        self.source.prepare(splits)
        for split in splits:
            pixel_table(self.source, split, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        """Fold indexes and manifests (every stage), training episodes (stage "fit" or None); idempotent."""
        if self.test_dataset is None:
            index = build_fold_index(
                self.source, self.eval_split, self.fold, min_pixels=self.min_pixels, cache_dir=self.cache_dir,
                classes=self.base_class_ids if self.eval_classes == "base" else self.novel_class_ids,
            )  # fmt: skip
            if self.eval_queries != "all":
                index = self._query_subset(index)
            test_man = self._manifest(index, self.eval_episodes, self.eval_seed)
            val_man = self._manifest(index, self.val_episodes, self.eval_seed + 1)
            base, novel, tf = self.base_class_ids, self.novel_class_ids, self.eval_transform
            self.val_dataset = EvalEpisodes(self.source, val_man, novel, base, tf)
            self.test_dataset = EvalEpisodes(self.source, test_man, novel, base, tf)
            self.eval_index, self._eval_manifest, self._val_manifest = index, test_man, val_man
            log.info("evaluation: %s; validation: %s", test_man, val_man)
        if stage in (None, "fit") and self.train_index is None:
            self.train_index = build_fold_index(
                self.source, "train", self.fold, min_pixels=self.min_pixels, train_filter=self.train_filter,
                cache_dir=self.cache_dir,
            )  # fmt: skip
            log.info("training: %s", self.train_index.summary())
            self.train_dataset = TrainEpisodes(
                self.source, self.train_index, self.shots, self.train_transform, seed=self.seed,
                length=self.train_episodes_per_epoch,
            )  # fmt: skip

    def prepare_feature_cache(self, model) -> fc.FeatureCache | None:
        """With ``feature_cache`` on: build (or resume, or open) the cache with ``model.encoder`` and train on it
        (``CachedTrainEpisodes``); a no-op when off. Refuses models with parts that read training images."""
        if self.feature_cache_cfg is None:
            return None
        if self.feature_cache is not None:
            return self.feature_cache
        if getattr(model, "support_masking", "none") != "none":
            raise ConfigError(
                "data.feature_cache caches the encoder's plain forward; model.support_masking="
                f"{model.support_masking} masks the supports inside the encoder: set data.feature_cache=null"
            )
        readers = fc.image_consumers(model)
        if readers:
            raise ConfigError(
                f"data.feature_cache: the model's part(s) {readers} read the training images (needs_images), "
                f"which a cached batch does not hold; set data.feature_cache=null"
            )
        self.setup("fit")
        self.feature_cache = fc.prepare(
            self.source, "train", self.train_transform, model.encoder, self.feature_cache_cfg, self.cache_dir
        )
        self.train_dataset = CachedTrainEpisodes(
            self.source, self.train_index, self.shots, self.train_transform, self.feature_cache, seed=self.seed,
            length=self.train_episodes_per_epoch,
        )  # fmt: skip
        return self.feature_cache

    def _query_subset(self, novel_index: FoldIndex) -> FoldIndex:
        """The novel-class index of the evaluation split with its queries restricted to the images that hold a
        qualifying base class (``with_base``) or none (``without_base``); supports still come from every
        qualifying image of the class."""
        with_base = set(
            build_fold_index(
                self.source, self.eval_split, self.fold, min_pixels=self.min_pixels, cache_dir=self.cache_dir,
                classes=self.base_class_ids,
            ).items
        )  # fmt: skip
        # Classes with too few images for an episode (query + shots supports) are left out (logged).
        classes = [c for c in novel_index.class_ids if len(novel_index.class_items[c]) > self.shots]
        item_classes = {
            i: [c for c in cs if c in classes]
            for i, cs in novel_index.item_classes.items()
            if (i in with_base) == (self.eval_queries == "with_base")
        }
        item_classes = {i: cs for i, cs in item_classes.items() if cs}
        keep = sorted(item_classes)
        if not keep:
            raise DataError(
                f"data.eval_queries={self.eval_queries!r}: no {self.source.name} {self.eval_split} image of fold "
                f"{self.fold} holds a novel class with >= {self.min_pixels} pixels "
                f"{'and' if self.eval_queries == 'with_base' else 'but no'} base class with as many"
            )
        present = sorted({c for cs in item_classes.values() for c in cs})
        left_out = sorted(set(novel_index.class_ids) - set(present))
        if left_out:
            log.info("eval_queries=%s: novel classes %s have no such query (or too few images)", self.eval_queries, left_out)
        return dataclasses.replace(
            novel_index, class_ids=present, items=keep,
            item_classes=item_classes, class_items={c: novel_index.class_items[c] for c in classes},
        )  # fmt: skip

    def _manifest(self, index: FoldIndex, count: int, seed: int) -> EpisodeManifest:
        src = self.source
        names = src.item_names(self.eval_split)
        root = str(src.root.resolve())
        key = stable_key({"source": src.fingerprint(self.eval_split), "classes": index.class_ids,
                          "min_pixels": self.min_pixels}, 10)  # fmt: skip
        split = self.eval_split if self.eval_queries == "all" else f"{self.eval_split}-{self.eval_queries}"
        name = f"{src.name}_fold{self.fold}_{split}_{self.shots}shot_seed{seed}_n{count}_{key}.json"
        return EpisodeManifest.load_or_create(
            self.cache_dir / "manifests" / name, index, names, dataset=src.name, root=root,
            shots=self.shots, seed=seed, count=count, class_names=src.class_names,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------ properties
    @property
    def eval_manifest(self) -> EpisodeManifest:
        """The test manifest (``.hash``, ``.path``, ``.episodes``); runs ``setup("test")`` if needed."""
        if self._eval_manifest is None:
            self.setup("test")
        return self._eval_manifest

    @property
    def val_manifest(self) -> EpisodeManifest:
        if self._val_manifest is None:
            self.setup("validate")
        return self._val_manifest

    @property
    def base_class_ids(self) -> list[int]:
        return list(self.source.fold_classes(self.fold)[0])

    @property
    def novel_class_ids(self) -> list[int]:
        """Classes of the evaluation split (CLASS_IDX at evaluation indexes this list); the base classes
        when ``eval_classes="base"`` (base-class episodes measure the base/novel generalisation gap)."""
        if self.eval_classes == "base":
            return self.base_class_ids
        if self.eval_split == "train":  # the background-bias diagnostic: the fold's novel classes
            return list(self.source.fold_classes(self.fold)[1])
        return list(self.source.split_class_ids(self.fold, self.eval_split))

    @property
    def num_novel_classes(self) -> int:
        return len(self.novel_class_ids)

    @property
    def class_names(self) -> list[str]:
        """All dataset class names; class id c is ``class_names[c - 1]``."""
        return self.source.class_names

    @property
    def novel_class_names(self) -> list[str]:
        names = self.source.class_names
        return [names[c - 1] for c in self.novel_class_ids]

    # ------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        if self.feature_cache_cfg is not None and self.feature_cache is None:
            model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
            if model is None:
                raise ConfigError(
                    "data.feature_cache needs the model's encoder: call datamodule.prepare_feature_cache(model) "
                    "before train_dataloader(), or train through a Trainer"
                )
            self.prepare_feature_cache(model)
        ds = self.train_dataset
        sampler = EpisodeSampler(len(self.train_index.items), len(ds), seed=self.seed)
        return DataLoader(
            ds, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate_episodes, drop_last=len(ds) > self.batch_size,
            worker_init_fn=functools.partial(seed_worker, self.seed), persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
        )  # fmt: skip

    def _eval_loader(self, ds: EvalEpisodes) -> DataLoader:
        return DataLoader(
            ds, batch_size=self.eval_batch_size, sampler=ShardedEvalSampler(len(ds)), num_workers=self.num_workers,
            collate_fn=collate_episodes, worker_init_fn=functools.partial(seed_worker, self.eval_seed),
            persistent_workers=self.num_workers > 0, pin_memory=self._pin_memory(),
        )  # fmt: skip

    def _pin_memory(self) -> bool:
        """Page-locked batches (fast, asynchronous host-to-device copies) only when the attached Trainer runs on
        CUDA; never on CPU (pinning would only cost)."""
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        device = getattr(strategy, "root_device", None)
        return device is not None and device.type == "cuda"

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._eval_loader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._eval_loader(self.test_dataset)
