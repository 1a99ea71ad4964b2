"""Fold index: for one (source, fold, split), which items qualify for which class.

Two cached layers, both under ``cache_dir`` and both keyed by a hash of everything they depend on:

1. ``pixel_table(source, split)`` - per item, the pixel count of every class present. Building it reads every
   label once (progress bar) and is where files are verified: image header readable (``verify_image``),
   label present, label size == image size, label values within the dataset's class ids. Key: the source's
   ``fingerprint(split)`` (reader, absolute root, class names, item list, list-file content/size/mtime or
   annotation-file size/mtime, reader parameters, and the size + mtime of every label file: a label edited
   after the first scan changes the key, so the split is scanned again). It does not depend on the fold, so
   all folds share it. Episodes check again, when they load a label, that it holds their class.
2. ``build_fold_index(...)`` - from the table: class -> sorted item indices where the class covers at least
   ``min_pixels`` pixels (PFENet: 2*32*32 = 2048), the query candidates (items with >= 1 qualifying class of
   the split's class list) and, in training, the image filter:
     - ``"keep"`` (PFENet): training images containing novel classes stay; novel pixels count as background
       in the episode masks;
     - ``"drop"`` (BAM ``filter_intersection``): training images containing any pixel of a novel class are
       removed (from the query list and from every class list). The dropped items are counted and reported.
   Key: table key + fold + split's class list + excluded (novel) classes + min_pixels + filter.

A class "qualifies" in an item when its pixel count is >= max(min_pixels, 1).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fsseg.data.sources import Source, atomic_write_bytes, atomic_write_text, stable_key
from fsseg.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TABLE_VERSION = 1
INDEX_VERSION = 1
TRAIN_FILTERS = ("keep", "drop")


@dataclass(frozen=True)
class PixelTable:
    """Sparse per-item class pixel counts of one split: entry k says item[k] has count[k] pixels of cls[k]."""

    split: str
    num_items: int
    item: np.ndarray  # int64 (E,)
    cls: np.ndarray  # int64 (E,)
    count: np.ndarray  # int64 (E,)
    path: Path | None = None

    def counts(self, i: int) -> dict[int, int]:
        sel = self.item == i
        return {int(c): int(n) for c, n in zip(self.cls[sel], self.count[sel])}


def table_key(source: Source, split: str) -> str:
    return stable_key({"version": TABLE_VERSION, "source": source.fingerprint(split)})


def pixel_table(source: Source, split: str, cache_dir: str | Path, progress: bool = True) -> PixelTable:
    """Load the split's class-pixel table from the cache, or scan (and verify) every item to build it."""
    source.check_split(split)
    items = source.items(split)
    key = table_key(source, split)
    path = Path(cache_dir) / "pixel_tables" / f"{source.name}_{split}_{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                table = PixelTable(split, int(z["num_items"]), z["item"], z["cls"], z["count"], path)
            if table.num_items == len(items):
                return table
            log.warning(
                "pixel table %s describes %d items, the split has %d: rebuilding",
                path, table.num_items, len(items),
            )  # fmt: skip
        except (OSError, ValueError, KeyError) as err:
            log.warning("pixel table %s is unreadable (%s): rebuilding", path, err)

    from tqdm.auto import tqdm

    n_cls = source.num_classes
    it, cl, co = [], [], []
    for i in tqdm(range(len(items)), desc=f"{source.name} {split}: scanning labels", unit="img",
                  disable=not progress, mininterval=1.0):  # fmt: skip
        label = source.check_item(split, i)
        counts = np.bincount(label.ravel(), minlength=n_cls + 1)[1 : n_cls + 1]
        nz = np.flatnonzero(counts)
        it.append(np.full(nz.size, i, np.int64))
        cl.append(nz.astype(np.int64) + 1)
        co.append(counts[nz].astype(np.int64))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64))
    table = PixelTable(split, len(items), cat(it), cat(cl), cat(co), path)
    buf = io.BytesIO()
    np.savez(buf, num_items=np.int64(table.num_items), item=table.item, cls=table.cls, count=table.count)
    atomic_write_bytes(path, buf.getvalue())
    log.info("%s %s: scanned %d labels -> %s", source.name, split, len(items), path)
    return table


@dataclass
class FoldIndex:
    """Which items of a split qualify for which class of a fold (see the module docstring)."""

    source: str
    split: str
    fold: int
    class_ids: list[int]  # the split's class list: base ids in training, novel (evaluated) ids otherwise
    excluded_ids: list[int]  # classes whose presence drops a training image under train_filter="drop"
    min_pixels: int
    train_filter: str | None  # None for evaluation splits (the filter applies to training only)
    num_total: int  # items in the split
    items: list[int]  # query candidates: items with >= 1 qualifying class, ascending
    item_classes: dict[int, list[int]]  # qualifying classes of each query candidate, ascending
    class_items: dict[int, list[int]]  # class id -> qualifying items, ascending (every id in class_ids)
    dropped: list[int] = field(default_factory=list)  # items removed by train_filter="drop"
    path: Path | None = None

    @property
    def num_dropped(self) -> int:
        return len(self.dropped)

    def class_counts(self) -> dict[int, int]:
        return {c: len(v) for c, v in self.class_items.items()}

    def require_images(
        self, n: int, purpose: str, class_names: list[str] | None = None, allow_empty: bool = False
    ) -> None:
        """DataError when a class of the split has fewer than ``n`` qualifying images (with ``allow_empty``,
        classes with none are let through: in training they are never drawn as a target)."""
        for c in self.class_ids:
            have = len(self.class_items.get(c, []))
            if have < n and not (allow_empty and have == 0):
                name = f" ({class_names[c - 1]})" if class_names and c <= len(class_names) else ""
                raise DataError(
                    f"class {c}{name} has {have} qualifying image(s) in the {self.source} {self.split} split "
                    f"(fold {self.fold}, min_pixels={self.min_pixels}"
                    + (f", train_filter={self.train_filter}" if self.train_filter else "")
                    + f"); {purpose} needs at least {n}"
                )

    def summary(self) -> str:
        counts = self.class_counts()
        lo, hi = min(counts.values(), default=0), max(counts.values(), default=0)
        s = (
            f"{self.source} {self.split} fold {self.fold}: {len(self.items)} of {self.num_total} images "
            f"have a class of the split with >= {self.min_pixels} pixels; images per class min {lo} max {hi}"
        )
        if self.train_filter is not None:
            s += f"; train_filter={self.train_filter}: dropped {self.num_dropped} images with novel classes"
        return s

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["item_classes"] = {str(k): v for k, v in self.item_classes.items()}
        d["class_items"] = {str(k): v for k, v in self.class_items.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Path | None = None) -> FoldIndex:
        d = dict(d)
        d["item_classes"] = {int(k): list(v) for k, v in d["item_classes"].items()}
        d["class_items"] = {int(k): list(v) for k, v in d["class_items"].items()}
        return cls(**d, path=path)


def build_fold_index(
    source: Source,
    split: str,
    fold: int,
    *,
    min_pixels: int = 2048,
    train_filter: str = "keep",
    cache_dir: str | Path = "outputs/cache",
    progress: bool = True,
    classes: Sequence[int] | None = None,
) -> FoldIndex:
    """Build (or load from the cache) the fold index of ``split``; the filter applies to "train" only.

    ``classes`` overrides the split's classes (e.g. the base classes of the evaluation split, to measure
    the base/novel generalisation gap).
    """
    source.check_split(split)
    source.check_fold(fold)
    if train_filter not in TRAIN_FILTERS:
        raise ConfigError(f"train_filter={train_filter!r}: expected one of {list(TRAIN_FILTERS)}")
    if int(min_pixels) < 0:
        raise ConfigError(f"min_pixels={min_pixels!r}: expected >= 0")
    min_pixels = int(min_pixels)
    is_train = split == "train"
    _, novel = source.fold_classes(fold)
    classes = sorted(classes if classes is not None else source.split_class_ids(fold, split))
    excluded = sorted(novel) if is_train else []
    filt = train_filter if is_train else None
    tkey = table_key(source, split)
    key = stable_key(
        {"version": INDEX_VERSION, "table": tkey, "fold": fold, "classes": classes, "excluded": excluded,
         "min_pixels": min_pixels, "filter": filt}
    )  # fmt: skip
    path = Path(cache_dir) / "fold_index" / f"{source.name}_{split}_fold{fold}_{key}.json"
    if path.is_file():
        try:
            return FoldIndex.from_json(json.loads(path.read_text()), path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("fold index %s is unreadable (%s): rebuilding", path, err)

    table = pixel_table(source, split, cache_dir, progress=progress)
    dropped: list[int] = []
    if filt == "drop":
        hit = np.isin(table.cls, excluded) & (table.count > 0)
        dropped = sorted(set(table.item[hit].tolist()))
    thr = max(min_pixels, 1)
    ok = np.isin(table.cls, classes) & (table.count >= thr)
    if dropped:
        ok &= ~np.isin(table.item, dropped)
    class_items: dict[int, list[int]] = {c: [] for c in classes}
    item_classes: dict[int, list[int]] = {}
    for i, c in sorted(zip(table.item[ok].tolist(), table.cls[ok].tolist())):
        class_items[c].append(i)
        item_classes.setdefault(i, []).append(c)
    index = FoldIndex(
        source=source.name, split=split, fold=fold, class_ids=classes, excluded_ids=excluded,
        min_pixels=min_pixels, train_filter=filt, num_total=table.num_items, items=sorted(item_classes),
        item_classes=item_classes, class_items=class_items, dropped=dropped, path=path,
    )  # fmt: skip
    atomic_write_text(path, json.dumps(index.to_json()))
    log.info("%s", index.summary())
    return index
