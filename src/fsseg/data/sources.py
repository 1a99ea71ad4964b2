"""Dataset readers ("sources"), each reading one benchmark in its native on-disk layout.

Every reader has the same interface, used by the fold index, the episode samplers and the data module:

    num_classes, class_names          dataset classes; class id c (1-based) is class_names[c - 1]
    num_folds, splits                 fold count and split names ("train", "val"[, "test"])
    fold_classes(fold)                -> (base_ids, novel_ids), sorted 1-based dataset ids
    split_class_ids(fold, split)      -> the classes episodes of `split` are drawn for: base ids for "train",
                                         novel ids otherwise (FSS-1000: the classes of that split)
    items(split)                      -> [(image_path, label_path), ...]
    item_names(split)                 -> image paths relative to root (stable names used by manifests)
    load(split, i)                    -> (image uint8 HxWx3 RGB, label HxW with dataset class ids,
                                          0 background, 255 ignore)
    prepare(splits)                   builds derived files (PASCAL lists, COCO masks); idempotent
    check_item(split, i)              verifies the image header and returns the checked label
    fingerprint(split)                what cached indexes built from this split depend on

Constructors never touch the disk (so configs can be composed and instantiated anywhere); missing or
malformed files raise :class:`~fsseg.errors.DataError` from ``prepare``/``items``/``load``, naming the file.
Images are read with PIL (torchvision.io is unavailable on CPU-only machines, see ``_torchvision_fix``).

Label dtype: uint8, except for a reader with 255 or more classes (a full FSS-1000 tree, 1000 classes), whose
labels are uint16. 255 is the ignore value of PASCAL and COCO; FSS-1000 masks are binary, so that reader has
no ignore value (``ignore_index = None``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fsseg.data.batch import IGNORE_INDEX
from fsseg.errors import ConfigError, DataError
from fsseg.io import sha256_bytes, stable_key, write_atomic, write_text_atomic  # noqa: F401 - stable_key re-exported

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- file helpers
atomic_write_bytes = write_atomic  # fsseg.io: temp file in the same folder + fsync + os.replace
atomic_write_text = write_text_atomic


def file_stamp(path: Path, content: bool = True) -> dict[str, Any]:
    """Identity of a file for cache keys: path, size, mtime and (small files) the sha256 of its content."""
    st = path.stat()
    stamp: dict[str, Any] = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if content:
        stamp["sha256"] = sha256_bytes(path.read_bytes())
    return stamp


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB; any decode failure is a DataError naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def _jpeg_has_end_marker(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1024))
        return b"\xff\xd9" in f.read()


def verify_image(path: str | Path) -> tuple[int, int]:
    """Check that ``path`` is a readable image without decoding it in full; returns its (height, width).

    PIL's ``verify`` checks the header (and PNG chunk CRCs). A JPEG whose end-of-image marker is missing
    (truncated download) is decoded in full to confirm, so truncation is reported here, not mid-training.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = im.format
            im.verify()
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except Exception as err:
        raise DataError(f"image {path} is unreadable: {type(err).__name__}: {err}") from err
    if fmt == "JPEG" and not _jpeg_has_end_marker(path):
        read_image(path)  # raises DataError("cannot decode ... truncated") if it is really truncated
    return h, w


def read_label_png(path: Path, image_path: Path | None = None) -> np.ndarray:
    """Read a single-channel (palette or grayscale) label PNG as a 2-D integer array."""
    if not path.is_file():
        what = f" for image {image_path}" if image_path is not None else ""
        raise DataError(f"label file {path}{what} does not exist (every image needs its mask)")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
                raise DataError(
                    f"label {path} has mode {im.mode!r}; expected a single-channel PNG "
                    "(palette or grayscale) holding class ids"
                )
            arr = np.array(im)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"cannot decode label {path}: {type(err).__name__}: {err}") from err
    if arr.ndim != 2:
        raise DataError(f"label {path} has shape {arr.shape}; expected a 2-D class-id map")
    return arr


def encode_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- base reader
class Source(ABC):
    """Common behaviour of the dataset readers (see the module docstring for the interface)."""

    name: str = "source"
    splits: tuple[str, ...] = ("train", "val")
    num_folds: int = 1
    ignore_index: int | None = IGNORE_INDEX

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self._items: dict[str, list[tuple[Path, Path]]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"

    # -- classes and folds
    @property
    @abstractmethod
    def class_names(self) -> list[str]: ...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @abstractmethod
    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]: ...

    def split_class_ids(self, fold: int, split: str) -> list[int]:
        """Classes episodes of ``split`` are drawn for: base classes in training, novel classes otherwise."""
        self.check_split(split)
        base, novel = self.fold_classes(fold)
        return list(base) if split == "train" else list(novel)

    def check_fold(self, fold: int) -> None:
        if not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < self.num_folds:
            raise ConfigError(
                f"fold={fold!r} is out of range for {type(self).__name__}: expected 0..{self.num_folds - 1}"
            )

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ConfigError(
                f"unknown split {split!r} for {type(self).__name__}: expected one of {list(self.splits)}"
            )

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"dataset root {self.root} does not exist or is not a folder ({type(self).__name__}; looked at "
                f"{self.root.absolute()}, from paths.data_dir / FSSEG_DATA or data.source.root). `make synth` "
                "creates the embedded benchmark in data/synth; run from the repository root or set paths.data_dir"
            )

    @property
    def label_dtype(self) -> type:
        return np.uint8 if self.num_classes < 255 else np.uint16

    # -- items
    def items(self, split: str) -> list[tuple[Path, Path]]:
        self.check_split(split)
        if split not in self._items:
            self.check_root()
            self._items[split] = self._list_items(split)
        return self._items[split]

    @abstractmethod
    def _list_items(self, split: str) -> list[tuple[Path, Path]]: ...

    def item_names(self, split: str) -> list[str]:
        root = self.root
        out = []
        for img, _ in self.items(split):
            try:
                out.append(img.relative_to(root).as_posix())
            except ValueError:
                out.append(img.as_posix())
        return out

    # -- loading
    def load_image(self, split: str, i: int) -> np.ndarray:
        return read_image(self.items(split)[i][0])

    def load_label(self, split: str, i: int) -> np.ndarray:
        label = self._read_label(split, i)
        self._check_values(label, self.items(split)[i][1])
        return label

    def _read_label(self, split: str, i: int) -> np.ndarray:
        img, lab = self.items(split)[i]
        return read_label_png(lab, img)

    def load(self, split: str, i: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.load_image(split, i)
        label = self.load_label(split, i)
        if label.shape != image.shape[:2]:
            img_path, lab_path = self.items(split)[i]
            raise DataError(
                f"label {lab_path} is {label.shape[0]}x{label.shape[1]} (HxW) but image {img_path} is "
                f"{image.shape[0]}x{image.shape[1]}; expected the same size"
            )
        return image, label

    def check_item(self, split: str, i: int) -> np.ndarray:
        """Verify image header and label (values, size) of item ``i``; returns the label."""
        img_path, lab_path = self.items(split)[i]
        h, w = verify_image(img_path)
        label = self.load_label(split, i)
        if label.shape != (h, w):
            raise DataError(
                f"label {lab_path} is {label.shape[0]}x{label.shape[1]} (HxW) but image {img_path} is "
                f"{h}x{w}; expected the same size"
            )
        return label

    def _check_values(self, label: np.ndarray, path: Path) -> None:
        n = self.num_classes
        if label.size == 0 or int(label.max()) <= n:
            return
        bad = label > n
        if self.ignore_index is not None:
            bad &= label != self.ignore_index
        if bad.any():
            values = np.unique(label[bad])
            shown = ", ".join(str(int(v)) for v in values[:10])
            allowed = f"0..{n}"
            if self.ignore_index is not None:
                allowed += f" and {self.ignore_index} (ignore)"
            raise DataError(
                f"label {path} holds unexpected value(s) {shown}; expected class ids {allowed} "
                f"for {n} classes of {type(self).__name__}"
            )

    # -- preparation and cache identity
    def prepare(self, splits: Iterable[str] | None = None) -> None:
        """Create derived files and check that the listed splits exist (idempotent, cheap when done)."""
        for split in splits or self.splits:
            self.items(split)

    def fingerprint(self, split: str) -> dict[str, Any]:
        """What an index built from ``split`` depends on (hashed into cache keys): the item list and the size
        and mtime of every label file, so a label edited after the first scan is scanned again."""
        return {
            "reader": type(self).__name__,
            "root": str(self.root.resolve()),
            "split": split,
            "classes": self.class_names,
            "items": sha256_bytes("\n".join(self.item_names(split)).encode()),
            "labels": self.label_stamp(split),
        }

    def label_stamp(self, split: str) -> str:
        """sha256 over (size, mtime_ns) of every label file of the split, in item order (-1 for a missing one:
        the scan then names it). One stat per file (docs/notes.md has the cost for PASCAL's 12k labels), once per
        reader instance and split: a run's setup asks for it several times (tables, fold indexes, manifests)."""
        stamps = self.__dict__.setdefault("_label_stamps", {})
        if split in stamps:
            return stamps[split]
        parts = []
        for _, lab in self.items(split):
            try:
                st = os.stat(lab)
                parts.append(f"{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append("-1")
        stamps[split] = sha256_bytes("\n".join(parts).encode())
        return stamps[split]


# ----------------------------------------------------------------------------------------------- PASCAL VOC
class PascalVOC(Source):
    """PASCAL-5i: VOC2012 ``JPEGImages`` + SBD-augmented ``SegmentationClassAug`` PNGs (values 0..20, 255).

    Layout under ``root`` (e.g. ``VOCdevkit/VOC2012``)::

        JPEGImages/<id>.jpg
        SegmentationClassAug/<id>.png
        lists/train.txt, lists/val.txt        PFENet format, one "JPEGImages/<id>.jpg
                                              SegmentationClassAug/<id>.png" per line, relative to root
                                              (``list_dir`` overrides the folder)
        classes.txt                           optional: one class name per line (the embedded synthetic
                                              benchmark); default: the 20 VOC classes

    A missing list file is derived from the standard files and written (atomically) into ``list_dir``:
    val = ``ImageSets/Segmentation/val.txt`` (1449 VOC val ids); train = ``ImageSets/Segmentation/train.txt``
    ∪ the SBD lists named by ``sbd_splits`` (``<sbd_dir>/train.txt`` [, ``val.txt``]; default sbd_dir
    ``root/SBD``) minus the VOC val ids, de-duplicated and sorted. The default ``sbd_splits=("train",)``
    reproduces PFENet's ``voc_sbd_merge_noduplicate`` list (VOC train 1464 + SBD train minus VOC val =
    5953 images); ``("train", "val")`` gives the 10582-image "trainaug" set.

    Folds: ``n = num_classes`` (divisible by 4); fold i's novel classes are ``n/4*i+1 .. n/4*(i+1)``
    (PASCAL: 5i+1..5i+5), base classes the rest.
    """

    name = "pascal"
    splits = ("train", "val")
    num_folds = 4

    def __init__(
        self,
        root: str | os.PathLike,
        list_dir: str | os.PathLike | None = None,
        sbd_dir: str | os.PathLike | None = None,
        sbd_splits: Sequence[str] = ("train",),
    ) -> None:
        super().__init__(root)
        self.list_dir = Path(list_dir).expanduser() if list_dir else self.root / "lists"
        self.sbd_dir = Path(sbd_dir).expanduser() if sbd_dir else self.root / "SBD"
        self.sbd_splits = tuple(sbd_splits)
        unknown = [s for s in self.sbd_splits if s not in ("train", "val")]
        if unknown or not self.sbd_splits:
            raise ConfigError(
                f"sbd_splits={list(self.sbd_splits)!r}: expected a non-empty subset of ['train', 'val']"
            )
        self._names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            path = self.root / "classes.txt"
            if path.is_file():
                names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
                if not names or len(names) % self.num_folds or len(names) >= 255:
                    raise DataError(
                        f"{path} lists {len(names)} classes; expected a positive multiple of "
                        f"{self.num_folds} below 255 (one class name per line)"
                    )
                self._names = names
            else:
                self._names = list(VOC_CLASSES)
        return list(self._names)

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        self.check_fold(fold)
        n = self.num_classes
        per = n // self.num_folds
        novel = list(range(per * fold + 1, per * fold + per + 1))
        base = [c for c in range(1, n + 1) if c not in novel]
        return base, novel

    def list_file(self, split: str) -> Path:
        return self.list_dir / f"{split}.txt"

    def _list_items(self, split: str) -> list[tuple[Path, Path]]:
        path = self.list_file(split)
        if not path.is_file():
            self._derive_lists()
        items = []
        for ln, line in enumerate(path.read_text().splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise DataError(
                    f"{path}, line {ln}: {line!r}; expected 'JPEGImages/<id>.jpg "
                    "SegmentationClassAug/<id>.png' (two paths relative to the dataset root)"
                )
            items.append((self.root / parts[0], self.root / parts[1]))
        if not items:
            raise DataError(f"list file {path} is empty")
        return items

    @staticmethod
    def _read_ids(path: Path) -> list[str]:
        return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]

    def _derive_lists(self) -> None:
        seg = self.root / "ImageSets" / "Segmentation"
        voc_train, voc_val = seg / "train.txt", seg / "val.txt"
        missing = [s for s in self.splits if not self.list_file(s).is_file()]
        if not (voc_train.is_file() and voc_val.is_file()):
            raise DataError(
                f"list file {self.list_file(missing[0])} does not exist, and it cannot be derived because "
                f"{voc_train if not voc_train.is_file() else voc_val} is missing (expected VOC2012 "
                "ImageSets/Segmentation/{train,val}.txt, or PFENet-format lists in the list folder)"
            )
        val_ids = sorted(set(self._read_ids(voc_val)))
        line = "JPEGImages/{0}.jpg SegmentationClassAug/{0}.png"
        if "val" in missing:
            atomic_write_text(self.list_file("val"), "\n".join(line.format(i) for i in val_ids) + "\n")
            log.info("PASCAL: derived %s from %s (%d images)", self.list_file("val"), voc_val, len(val_ids))
        if "train" in missing:
            sbd_files = [self.sbd_dir / f"{s}.txt" for s in self.sbd_splits]
            absent = [f for f in sbd_files if not f.is_file()]
            if absent:
                raise DataError(
                    f"list file {self.list_file('train')} does not exist, and it cannot be derived because "
                    f"the SBD list {absent[0]} is missing (set sbd_dir=, or write PFENet-format lists)"
                )
            voc_ids = set(self._read_ids(voc_train))
            sbd_ids: set[str] = set()
            for f in sbd_files:
                sbd_ids.update(self._read_ids(f))
            ids = sorted((voc_ids | sbd_ids) - set(val_ids))
            atomic_write_text(self.list_file("train"), "\n".join(line.format(i) for i in ids) + "\n")
            log.info(
                "PASCAL: derived %s (%d images = VOC train %d ∪ SBD %s %d, minus VOC val %d, deduplicated)",
                self.list_file("train"), len(ids), len(voc_ids), "+".join(self.sbd_splits), len(sbd_ids),
                len(val_ids),
            )  # fmt: skip

    def prepare(self, splits: Iterable[str] | None = None) -> None:
        self.check_root()
        _ = self.class_names  # validates classes.txt
        super().prepare(splits)

    def fingerprint(self, split: str) -> dict[str, Any]:
        fp = super().fingerprint(split)
        fp["list"] = file_stamp(self.list_file(split))
        return fp


# ----------------------------------------------------------------------------------------------- COCO
class COCO(Source):
    """COCO-20i from the instance annotations, for COCO 2014 or 2017.

    Layout under ``root``: ``annotations/instances_{train,val}{year}.json`` (or the json files directly in
    root) and images in ``{train,val}{year}/`` (or ``images/{train,val}{year}/``).

    Classes: the categories sorted by category id get class ids 1..80. Folds (``split_mode``):
    "interleaved" (FWB / PFENet ``use_split_coco``): fold i novel = {4k + i + 1, k = 0..19};
    "contiguous" (PANet): fold i novel = 20i+1..20i+20.

    Class masks are built once with pycocotools (``prepare``, with a progress bar) and cached as PNGs under
    ``mask_dir/{split}{year}_crowd-{crowd}/<image stem>.png`` (default mask_dir: ``root/fsseg_masks``); each
    PNG is written atomically, so an interrupted build resumes where it stopped. A per-split index
    (``{split}{year}_index.json``: categories, image list) avoids re-reading the large json; it is rebuilt
    when the json's size or mtime changes. Masks are keyed by split, year and crowd policy only: delete the
    mask folder after editing an annotation file.

    Painting rule: non-crowd annotations are painted in order of decreasing ``area`` (ties: increasing
    annotation id), each overwriting earlier ones, so where objects overlap the smaller object wins.
    Crowd annotations (``iscrowd=1``), then:
      - ``crowd="ignore"`` (default): crowd pixels not covered by a non-crowd annotation become 255 (ignored
        by losses and metrics);
      - ``crowd="background"``: crowd annotations are skipped, their pixels stay 0 - what the reference
        implementations (PFENet, BAM, CyCTR lists) do.
    """

    name = "coco"
    splits = ("train", "val")
    num_folds = 4

    def __init__(
        self,
        root: str | os.PathLike,
        year: int = 2014,
        split_mode: str = "interleaved",
        crowd: str = "ignore",
        mask_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(root)
        if int(year) not in (2014, 2017):
            raise ConfigError(f"COCO year={year!r}: expected 2014 or 2017")
        if split_mode not in ("interleaved", "contiguous"):
            raise ConfigError(f"COCO split_mode={split_mode!r}: expected 'interleaved' or 'contiguous'")
        if crowd not in ("ignore", "background"):
            raise ConfigError(
                f"COCO crowd={crowd!r}: expected 'ignore' (crowd pixels 255) or 'background' (0)"
            )
        self.year = int(year)
        self.split_mode = split_mode
        self.crowd = crowd
        self.mask_dir = Path(mask_dir).expanduser() if mask_dir else self.root / "fsseg_masks"
        self._index: dict[str, dict[str, Any]] = {}
        self._json: dict[str, dict[str, Any]] = {}  # loaded annotation files, kept only while prepare() runs
        self._keep_json = False
        self._names: list[str] | None = None

    # -- files
    def annotation_file(self, split: str) -> Path:
        self.check_split(split)
        name = f"instances_{split}{self.year}.json"
        candidates = [self.root / "annotations" / name, self.root / name]
        for c in candidates:
            if c.is_file():
                return c
        self.check_root()
        raise DataError(f"COCO annotation file not found: expected {candidates[0]} (or {candidates[1]})")

    def image_dir(self, split: str) -> Path:
        name = f"{split}{self.year}"
        candidates = [self.root / name, self.root / "images" / name]
        for c in candidates:
            if c.is_dir():
                return c
        self.check_root()
        raise DataError(f"COCO image folder not found: expected {candidates[0]} (or {candidates[1]})")

    def split_mask_dir(self, split: str) -> Path:
        return self.mask_dir / f"{split}{self.year}_crowd-{self.crowd}"

    def _index_file(self, split: str) -> Path:
        return self.mask_dir / f"{split}{self.year}_index.json"

    def _load_json(self, split: str) -> dict[str, Any]:
        if split in self._json:
            return self._json[split]
        path = self.annotation_file(split)
        log.info("COCO: reading %s", path)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read COCO annotation file {path}: {err}") from err
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise DataError(f"COCO annotation file {path} has no {key!r} list")
        if self._keep_json:
            self._json[split] = data
        return data

    def _split_index(self, split: str) -> dict[str, Any]:
        """Categories and image list of a split, from the cached index file when it is current."""
        if split in self._index:
            return self._index[split]
        ann = self.annotation_file(split)
        st = ann.stat()
        stamp = {"annotation_file": str(ann.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        path = self._index_file(split)
        index = None
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
                if cached.get("stamp") == stamp:
                    index = cached
            except (OSError, ValueError):
                index = None
        if index is None:
            data = self._load_json(split)
            cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
            images = sorted(
                (str(im["file_name"]), int(im["id"]), int(im["height"]), int(im["width"]))
                for im in data["images"]
            )
            index = {"stamp": stamp, "categories": cats, "images": images}
            atomic_write_text(path, json.dumps(index))
        self._index[split] = index
        return index

    # -- classes
    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            for split in self.splits:
                try:
                    self.annotation_file(split)
                except DataError:
                    continue
                self._names = [name for _, name in self._split_index(split)["categories"]]
                break
            else:
                self.annotation_file("train")  # raises the DataError naming the expected file
        return list(self._names)

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        self.check_fold(fold)
        n = self.num_classes
        per = n // self.num_folds
        if self.split_mode == "interleaved":
            novel = [self.num_folds * k + fold + 1 for k in range(per)]
        else:
            novel = list(range(per * fold + 1, per * fold + per + 1))
        base = [c for c in range(1, n + 1) if c not in novel]
        return base, novel

    # -- items and masks
    def _list_items(self, split: str) -> list[tuple[Path, Path]]:
        index = self._split_index(split)
        img_dir, mask_dir = self.image_dir(split), self.split_mask_dir(split)
        return [(img_dir / fn, mask_dir / (Path(fn).stem + ".png")) for fn, _, _, _ in index["images"]]

    def _read_label(self, split: str, i: int) -> np.ndarray:
        img, lab = self.items(split)[i]
        if not lab.is_file():
            raise DataError(
                f"COCO mask {lab} for image {img} has not been built; run the data module's prepare_data() "
                "(or COCO.prepare()) first"
            )
        return read_label_png(lab, img)

    def prepare(self, splits: Iterable[str] | None = None) -> None:
        """Build the missing class masks of each split (progress bar), then check the categories agree."""
        from tqdm.auto import tqdm

        self.check_root()
        cats = None
        self._keep_json = True
        try:
            for split in splits or self.splits:
                index = self._split_index(split)  # reads the json only when the cached index is stale
                todo = [i for i, (_, lab) in enumerate(self.items(split)) if not lab.is_file()]
                if todo:
                    self._build_masks(split, self._load_json(split), todo, tqdm)
                if cats is not None and cats != index["categories"]:
                    raise DataError(
                        f"COCO categories of {self.annotation_file(split)} differ from the other split's; "
                        "expected the same categories in train and val"
                    )
                cats = index["categories"]
        finally:
            self._keep_json = False
            self._json.clear()

    def _build_masks(self, split: str, data: dict[str, Any], todo: list[int], tqdm) -> None:
        self.__dict__.pop("_label_stamps", None)  # the masks (labels) change: stamp them again
        from pycocotools import mask as mask_utils

        cat_to_class = {cid: k + 1 for k, (cid, _) in enumerate(self._split_index(split)["categories"])}
        anns_by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for a in data["annotations"]:
            anns_by_image[int(a["image_id"])].append(a)
        index = self._split_index(split)["images"]
        items = self.items(split)
        ann_file = self.annotation_file(split)
        for i in tqdm(todo, desc=f"COCO {split}{self.year} masks", unit="img", mininterval=1.0):
            _, image_id, h, w = index[i]
            label = self.paint(anns_by_image.get(image_id, []), h, w, cat_to_class, mask_utils, ann_file)
            atomic_write_bytes(items[i][1], encode_png(label))

    def paint(self, anns, h: int, w: int, cat_to_class: dict[int, int], mask_utils, ann_file) -> np.ndarray:
        """Class mask of one image from its annotations (rule in the class docstring)."""
        label = np.zeros((h, w), np.uint8)
        normal = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [a for a in anns if a.get("iscrowd", 0)]
        normal.sort(key=lambda a: (-float(a.get("area", 0.0)), int(a.get("id", 0))))
        for a in normal:
            cid = int(a["category_id"])
            if cid not in cat_to_class:
                raise DataError(
                    f"{ann_file}: annotation {a.get('id')} has category_id {cid}, "
                    "which is not in 'categories'"
                )
            label[self._ann_mask(a, h, w, mask_utils, ann_file)] = cat_to_class[cid]
        if self.crowd == "ignore":
            for a in crowd:
                m = self._ann_mask(a, h, w, mask_utils, ann_file)
                label[m & (label == 0)] = IGNORE_INDEX
        return label

    @staticmethod
    def _ann_mask(ann, h: int, w: int, mask_utils, ann_file) -> np.ndarray:
        segm = ann.get("segmentation")
        try:
            if isinstance(segm, list):
                polys = [p for p in segm if len(p) >= 6]
                if not polys:
                    return np.zeros((h, w), bool)
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
                rle = mask_utils.frPyObjects(segm, h, w)
            elif isinstance(segm, dict):
                rle = dict(segm)
                if isinstance(rle["counts"], str):
                    rle["counts"] = rle["counts"].encode("ascii")
            else:
                raise TypeError(f"segmentation of type {type(segm).__name__}")
            m = mask_utils.decode(rle)
        except Exception as err:
            raise DataError(
                f"{ann_file}: cannot decode the segmentation of annotation {ann.get('id')}: {err}"
            ) from err
        if m.shape[:2] != (h, w):
            raise DataError(
                f"{ann_file}: annotation {ann.get('id')} decodes to {m.shape[:2]}, but its image is {h}x{w}"
            )
        return m.astype(bool).reshape(h, w)

    def fingerprint(self, split: str) -> dict[str, Any]:
        fp = super().fingerprint(split)
        fp.update(
            year=self.year,
            crowd=self.crowd,
            masks=str(self.split_mask_dir(split).resolve()),
            annotations=self._split_index(split)["stamp"],
        )
        return fp

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_index"] = {}  # loader workers need the item lists (_items) and class names (_names) only
        state["_json"] = {}
        return state


# ----------------------------------------------------------------------------------------------- FSS-1000
class FSS1000(Source):
    """FSS-1000: ``root/<class name>/<n>.jpg`` with binary masks ``<n>.png``.

    Class ids 1..N follow the sorted class-folder names. A mask pixel is foreground when its grayscale
    value is >= 128 (HSNet's binarisation); the foreground of an image gets its class id, the rest 0. There is
    no ignore value. Images of a class are ordered by their numeric file stem (1..10).

    Splits are class splits. If ``split_dir`` (default ``root/splits``) holds ``train.txt`` (or HSNet's
    ``trn.txt``), ``val.txt`` and ``test.txt`` (one class name per line), they define them. Otherwise the
    sorted class names are cut in order: the first round(0.52 N) classes are train, the next round(0.24 N)
    val, the rest test (520/240/240 for the 1000 classes).

    One fold: base = train classes, novel = val ∪ test classes; episodes of the val (test) split use the val
    (test) classes (``split_class_ids``).
    """

    name = "fss1000"
    splits = ("train", "val", "test")
    num_folds = 1
    ignore_index = None

    def __init__(self, root: str | os.PathLike, split_dir: str | os.PathLike | None = None) -> None:
        super().__init__(root)
        self.split_dir = Path(split_dir).expanduser() if split_dir else self.root / "splits"
        self._names: list[str] | None = None
        self._split_names: dict[str, list[str]] | None = None
        self._ids_by_name: dict[str, int] | None = None

    @property
    def class_names(self) -> list[str]:
        if self._names is None:
            self.check_root()
            skip = self.split_dir.resolve()
            names = sorted(
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.resolve() != skip
            )
            if not names:
                raise DataError(
                    f"FSS-1000 root {self.root} has no class folders (expected <class>/<n>.jpg + <n>.png)"
                )
            self._names = names
        return list(self._names)

    def split_classes(self) -> dict[str, list[str]]:
        """Class names of each split (see the class docstring for the rule)."""
        if self._split_names is None:
            names = self.class_names
            files = {s: self.split_dir / f"{s}.txt" for s in self.splits}
            if not files["train"].is_file() and (self.split_dir / "trn.txt").is_file():
                files["train"] = self.split_dir / "trn.txt"
            present = [f for f in files.values() if f.is_file()]
            if present:
                absent = [str(f) for f in files.values() if not f.is_file()]
                if absent:
                    raise DataError(f"FSS-1000 split files incomplete: {absent} missing beside {present[0]}")
                out = {}
                known = set(names)
                for s, f in files.items():
                    cls = [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
                    unknown = [c for c in cls if c not in known]
                    if unknown:
                        raise DataError(f"{f} names class(es) {unknown[:5]} with no folder under {self.root}")
                    out[s] = sorted(set(cls))
                seen: dict[str, str] = {}
                for s, cls in out.items():
                    for c in cls:
                        if c in seen:
                            raise DataError(
                                f"FSS-1000 class {c!r} is in both the {seen[c]} and {s} split files"
                            )
                        seen[c] = s
            else:
                n = len(names)
                n_train, n_val = round(0.52 * n), round(0.24 * n)
                out = {
                    "train": names[:n_train],
                    "val": names[n_train : n_train + n_val],
                    "test": names[n_train + n_val :],
                }
            self._split_names = out
        return {k: list(v) for k, v in self._split_names.items()}

    def _ids(self, names: Iterable[str]) -> list[int]:
        pos = {n: k + 1 for k, n in enumerate(self.class_names)}
        return sorted(pos[n] for n in names)

    def fold_classes(self, fold: int) -> tuple[list[int], list[int]]:
        self.check_fold(fold)
        sc = self.split_classes()
        return self._ids(sc["train"]), self._ids(sc["val"] + sc["test"])

    def split_class_ids(self, fold: int, split: str) -> list[int]:
        self.check_split(split)
        self.check_fold(fold)
        return self._ids(self.split_classes()[split])

    @staticmethod
    def _stem_key(p: Path) -> tuple[int, int, str]:
        return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem)

    def _list_items(self, split: str) -> list[tuple[Path, Path]]:
        names = self.class_names
        items = []
        for cid in self.split_class_ids(0, split):
            folder = self.root / names[cid - 1]
            jpgs = [p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")]
            jpgs.sort(key=self._stem_key)
            if not jpgs:
                raise DataError(f"FSS-1000 class folder {folder} has no .jpg images")
            for p in jpgs:
                items.append((p, p.with_suffix(".png")))
        return items

    def _read_label(self, split: str, i: int) -> np.ndarray:
        img, lab = self.items(split)[i]
        if not lab.is_file():
            raise DataError(f"mask {lab} for image {img} does not exist (every image needs its <n>.png mask)")
        try:
            with Image.open(lab) as im:
                gray = np.array(im.convert("L"))
        except Exception as err:
            raise DataError(f"cannot decode mask {lab}: {type(err).__name__}: {err}") from err
        if self._ids_by_name is None:
            self._ids_by_name = {n: k + 1 for k, n in enumerate(self.class_names)}
        cid = self._ids_by_name[img.parent.name]
        label = np.zeros(gray.shape, self.label_dtype)
        label[gray >= 128] = cid
        return label

    def fingerprint(self, split: str) -> dict[str, Any]:
        fp = super().fingerprint(split)
        fp["split_classes"] = self.split_classes()[split]
        return fp
