"""Cached frozen features: V pre-augmented views of every training image, encoded once, read by training.

Opt-in with ``data.feature_cache`` (off by default: ``null``)::

    fsseg-train experiment=pfenet_effl0_synth_cached                      # views=4
    fsseg-train experiment=pfenet_effl0_synth 'data.feature_cache={views: 2}'

What is stored, under ``<cache_dir>/features/<reader>-<root folder>_<encoder>_<size>px_v<V>_<key>/``:

- for every image i of the training split (all of them, so one cache serves every fold) and every view
  v < V: the view's encoder taps (``taps_<name>.f16``, float16, shape (N, V, C, h, w)) and its augmented
  full label map (``labels.u8``, uint8, (N, V, S, S) at ``train_size`` S, padding/ignore 255), both
  ``numpy.memmap`` files;
- view v of image i is ``TrainTransform(image_i, [label_i], rng)`` with ``rng = default_rng([seed, i, v])``:
  the recipe's own augmentation (scale, rotation, blur, flip, pad, crop, normalisation) drawn with a fixed
  seed, image and label moved together. Episode masks are derived from the stored label exactly as
  ``TrainEpisodes`` derives them (binary mask of the target class, base-class label); the spatial
  transforms are nearest-neighbour on masks and pad with 255, so deriving after the transform equals
  transforming the derived mask.

What augmentation remains: training draws episodes as before (``TrainEpisodes.draw``: same query, class
and supports for a given (seed, epoch, position)) and then picks one of the V stored views for the query
and for each support, uniformly, from the episode's generator. So an image is seen in at most V distinct
augmentations over the whole run instead of a fresh one per episode; the pairing of views within an
episode is still fresh. With ``views=1`` every episode sees one fixed augmentation per image.

The key (sha256 of): the split's fingerprint (reader, root, item list, list file stamp), the encoder
(class, timm name, weights setting, taps, output stride, model kwargs, pooling, dilation, memory format,
and the sha256 of its state dict: the weights actually loaded), ``train_size``, V, the augmentation
(albumentations' serialisation of the pipeline + its version), the cache seed, torch/timm versions and
``FORMAT_VERSION``. Another key is another folder: a cache is never reused for another key; a folder whose
recorded key differs from its name's (edited, copied) is rebuilt, and says so.

Build: estimated size checked first (``max_gb``, free disk), then images are processed in chunks of
``chunk`` images; after each chunk the memory maps are flushed and ``progress.json`` records the images done
(atomically). An interrupted build resumes at the last finished chunk and produces the same bytes (each
view is a function of (seed, i, v); chunks and encoder batches are the same). ``complete.json`` is written
last (temp name + ``os.replace``). A complete cache whose files have the wrong size is rebuilt. A lock
file serialises concurrent builders (DDP ranks, parallel sweep jobs).

Evaluation never reads the cache (validation and test episodes use original images and labels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fsseg.data import batch as B
from fsseg.data.sources import Source
from fsseg.data.transforms import TrainTransform
from fsseg.errors import ConfigError, DataError
from fsseg.io import stable_key
from fsseg.io import write_text_atomic as atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LABEL_FILE = "labels.u8"


@dataclasses.dataclass(frozen=True)
class FeatureCacheConfig:
    """``data.feature_cache``: views (V), seed (of the views' augmentation), max_gb (refuse larger caches),
    chunk (images per resumable step), batch (views per encoder call), dir (default: cache_dir/features)."""

    views: int = 4
    seed: int = 0
    max_gb: float = 4.0
    chunk: int = 64
    batch: int = 32
    dir: str | None = None


def parse_config(value: Any) -> FeatureCacheConfig | None:
    """``data.feature_cache`` -> config, or None when off (null, false, or ``enabled: false``)."""
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"data.feature_cache={value!r}: expected null (off) or a mapping such as {{views: 4}} "
            f"(keys: enabled, {', '.join(f.name for f in dataclasses.fields(FeatureCacheConfig))})"
        )
    value = dict(value)
    if not value.pop("enabled", True):
        return None
    names = {f.name for f in dataclasses.fields(FeatureCacheConfig)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"data.feature_cache: unknown option(s) {unknown}; known: enabled, {sorted(names)}")

    def integer(name: str, minimum: int) -> int:
        v = value.get(name, getattr(FeatureCacheConfig, name))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < minimum:
            raise ConfigError(f"data.feature_cache.{name}={v!r}: expected an integer >= {minimum}")
        return int(v)

    max_gb = value.get("max_gb", FeatureCacheConfig.max_gb)
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0:
        raise ConfigError(f"data.feature_cache.max_gb={max_gb!r}: expected a positive number of GB")
    d = value.get("dir")
    return FeatureCacheConfig(
        views=integer("views", 1), seed=integer("seed", 0), max_gb=float(max_gb), chunk=integer("chunk", 1),
        batch=integer("batch", 1), dir=None if d in (None, "") else str(d),
    )  # fmt: skip


def image_consumers(model: nn.Module) -> list[str]:
    """Submodules (other than the encoder) that declare ``needs_images = True``: they read the images of a
    training batch, which a cached batch does not hold."""
    return [name or type(model).__name__ for name, m in model.named_modules() if getattr(m, "needs_images", False)]


# --------------------------------------------------------------------------------------------------- key
def state_dict_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encoder_identity(encoder: nn.Module) -> dict[str, Any]:
    ident: dict[str, Any] = {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}"}
    for attr in ("name", "weights", "taps", "output_stride", "model_kwargs", "feature_pool", "pspnet_dilation",
                 "channels_last", "tap_channels", "mean", "std"):  # fmt: skip
        if hasattr(encoder, attr):
            v = getattr(encoder, attr)
            ident[attr] = {str(k): v[k] for k in v} if isinstance(v, Mapping) else v
    ident["state_sha256"] = state_dict_sha256(encoder)
    return ident


def augmentation_identity(transform: TrainTransform) -> dict[str, Any]:
    import albumentations as A

    try:
        pipeline: Any = A.to_dict(transform.pipeline)
    except Exception:  # noqa: BLE001 - a transform albumentations cannot serialise: its repr
        pipeline = repr(transform.pipeline)
    return {"albumentations": A.__version__, "size": transform.size, "mean": list(transform.mean),
            "std": list(transform.std), "pipeline": pipeline}  # fmt: skip


def cache_key(source: Source, split: str, transform: TrainTransform, encoder: nn.Module,
              cfg: FeatureCacheConfig) -> dict[str, Any]:  # fmt: skip
    import timm

    return {
        "format": FORMAT_VERSION,
        "dataset": source.fingerprint(split),
        "encoder": encoder_identity(encoder),
        "resolution": transform.size,
        "views": cfg.views,
        "augmentation": augmentation_identity(transform),
        "seed": cfg.seed,
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".") or "<root>"]


# --------------------------------------------------------------------------------------------------- cache
class FeatureCache:
    """A complete cache folder, memory-mapped lazily (per process: a pickled cache re-opens its maps)."""

    def __init__(self, path: Path, layout: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.layout = dict(layout)
        self.num_images = int(layout["num_images"])
        self.views = int(layout["views"])
        self.tap_shapes = {t: tuple(s) for t, s in layout["taps"].items()}  # stored taps: (C, h, w)
        # taps equal to a channel slice of a stored tap (efficientnet-lite0: high = mid[:, :112]): not stored
        self.aliases = {t: (str(a[0]), int(a[1]), int(a[2])) for t, a in layout.get("aliases", {}).items()}
        self.label_shape = tuple(layout["label"])  # (S, S)
        self._maps: dict[str, np.memmap] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = None  # never pickle a mapped array: each worker maps the files itself
        return state

    @staticmethod
    def tap_file(tap: str) -> str:
        return f"taps_{tap}.f16"

    def files(self) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
        n, v = self.num_images, self.views
        out = {t: (self.tap_file(t), np.dtype(np.float16), (n, v, *s)) for t, s in self.tap_shapes.items()}
        out[B.QUERY_MASK] = (LABEL_FILE, np.dtype(np.uint8), (n, v, *self.label_shape))
        return out

    def nbytes(self) -> int:
        return sum(int(np.prod(shape)) * dt.itemsize for _, dt, shape in self.files().values())

    def open(self, mode: str = "r") -> dict[str, np.memmap]:
        return {k: np.memmap(self.path / f, dtype=dt, mode=mode, shape=shape) for k, (f, dt, shape) in self.files().items()}

    @property
    def maps(self) -> dict[str, np.memmap]:
        if self._maps is None:
            self._maps = self.open("r")
        return self._maps

    def labels(self, items: np.ndarray, views: np.ndarray) -> np.ndarray:
        """uint8 labels (len, S, S) of (item, view) pairs (a copy)."""
        return np.asarray(self.maps[B.QUERY_MASK][items, views])

    def taps(self, items: np.ndarray, views: np.ndarray) -> dict[str, torch.Tensor]:
        """float16 taps {name: (len, C, h, w)} of (item, view) pairs (copies)."""
        out = {t: torch.from_numpy(np.asarray(self.maps[t][items, views])) for t in self.tap_shapes}
        for t, (src, c0, c1) in self.aliases.items():
            out[t] = out[src][:, c0:c1]
        return out

    def size_problem(self) -> str | None:
        """Why the files do not match the layout (missing, wrong size), or None."""
        for f, dt, shape in self.files().values():
            p = self.path / f
            want = int(np.prod(shape)) * dt.itemsize
            if not p.is_file():
                return f"{f} is missing"
            if p.stat().st_size != want:
                return f"{f} has {p.stat().st_size} bytes, expected {want}"
        return None

    def __repr__(self) -> str:
        return f"FeatureCache({self.path}, {self.num_images} images x {self.views} views, {self.nbytes() / 1e9:.2f} GB)"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
            pass
        yield


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tap_layout(encoder: nn.Module, size: int, device: torch.device) -> tuple[dict[str, list[int]], dict[str, list]]:
    """(stored taps {name: [C, h, w]}, aliases {name: [stored tap, c0, c1]}). A tap is an alias when the
    encoder's tap definition makes it a channel slice of another tap (its feature indices a contiguous run of
    the other's, at the same size) and one probe forward confirms it bit for bit."""
    g = torch.Generator().manual_seed(0)  # a local generator: the global RNG stays untouched
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, size, size, generator=g).to(device))
    taps: dict = getattr(encoder, "taps", {}) or {}
    chans: dict = getattr(encoder, "feature_channels", {}) or {}
    stored: dict[str, list[int]] = {}
    aliases: dict[str, list] = {}
    for name in sorted(out, key=lambda t: (-out[t].shape[1], t)):
        found = None
        for src in stored:
            idx_s, idx_t = list(taps.get(src, [])), list(taps.get(name, []))
            if not idx_t or out[src].shape[-2:] != out[name].shape[-2:] or any(i not in chans for i in idx_s):
                continue
            for p in range(len(idx_s) - len(idx_t) + 1):
                if idx_s[p : p + len(idx_t)] == idx_t:
                    c0 = sum(chans[i] for i in idx_s[:p])
                    c1 = c0 + out[name].shape[1]
                    if torch.equal(out[src][:, c0:c1], out[name]):
                        found = [src, c0, c1]
                        break
            if found:
                break
        if found:
            aliases[name] = found
        else:
            stored[name] = [int(d) for d in out[name].shape[1:]]
    return stored, aliases


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def render_view(source: Source, split: str, transform: TrainTransform, seed: int, item: int, view: int,
                loaded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[torch.Tensor, np.ndarray]:  # fmt: skip
    """View ``view`` of training image ``item``: (normalised image (3, S, S), uint8 label (S, S), 255 = ignore
    or padding). The function every cached entry is computed from (tests compare against it)."""
    img, label = loaded if loaded is not None else source.load(split, item)
    rng = np.random.default_rng([int(seed), int(item), int(view)])
    t_img, (t_lab,) = transform(img, [label], rng)
    return t_img, t_lab.numpy().astype(np.uint8)


def prepare(
    source: Source,
    split: str,
    transform: TrainTransform,
    encoder: nn.Module,
    cfg: FeatureCacheConfig,
    root: str | os.PathLike[str],
    *,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> FeatureCache:
    """Open the cache for this key, building (or resuming) it first if needed; see the module docstring.

    ``on_chunk(done)`` is called after each finished chunk (tests interrupt a build from it).
    """
    if any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(
            "data.feature_cache needs a frozen encoder (encoder.frozen=true): cached features would be stale "
            "once the encoder trains"
        )
    if getattr(encoder, "bn", "frozen") != "frozen":
        raise ConfigError(
            "data.feature_cache needs encoder.bn=frozen: with batch-statistics BatchNorm (encoder.bn=train) a "
            "training image's taps depend on the batch it is in"
        )
    if len(source.class_names) >= B.IGNORE_INDEX:
        raise ConfigError(
            f"data.feature_cache stores labels as uint8 with 255 = ignore/padding; {source.name} has "
            f"{len(source.class_names)} classes. Use data.feature_cache=null for this dataset"
        )
    key_dict = cache_key(source, split, transform, encoder, cfg)
    key = stable_key(key_dict, 16)
    enc_name = str(getattr(encoder, "name", type(encoder).__name__)).replace("/", "_")
    folder = Path(cfg.dir) if cfg.dir else Path(root) / "features"
    dataset = f"{source.name}-{Path(source.root).name}"  # reader and folder: pascal-synth, pascal-VOC2012 ...
    path = folder / f"{dataset}_{enc_name}_{transform.size}px_v{cfg.views}_{key}"
    n = len(source.item_names(split))
    device = _device(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        stored, aliases = _tap_layout(encoder, transform.size, device)
        layout = {"num_images": n, "views": cfg.views, "taps": stored, "aliases": aliases,
                  "label": [transform.size, transform.size]}  # fmt: skip
        cache = FeatureCache(path, layout)
        with _locked(path):
            return _open_or_build(cache, key, key_dict, source, split, transform, encoder, cfg, device,
                                  progress, on_chunk)  # fmt: skip
    finally:
        encoder.train(was_training)


def _open_or_build(cache, key, key_dict, source, split, transform, encoder, cfg, device, progress, on_chunk):
    path = cache.path
    complete = _read_json(path / "complete.json")
    if complete is not None:
        why = None
        if complete.get("key") != key or complete.get("key_dict") != json.loads(json.dumps(key_dict, default=str)):
            fields = _diff(complete.get("key_dict") or {}, json.loads(json.dumps(key_dict, default=str)))
            why = f"it was built for another key (differs in: {', '.join(fields[:6]) or 'key'})"
        elif complete.get("layout") != cache.layout:
            why = f"its layout {complete.get('layout')} is not {cache.layout}"
        else:
            why = cache.size_problem()
            why = why and f"it is corrupt or truncated ({why})"
        if why is None:
            log.info("feature cache: using %s (key %s)", path, key)
            return cache
        log.warning("feature cache %s: %s; rebuilding it", path, why)
        _wipe(path)
    meta = _read_json(path / "meta.json")
    state = _read_json(path / "progress.json") or {}
    done = 0
    resumable = meta is not None and meta.get("key") == key and meta.get("layout") == cache.layout
    problem = cache.size_problem() if resumable else None
    if resumable and problem is None:
        done = int(state.get("done", 0)) if state.get("key") == key else 0
        if done:
            log.warning("feature cache %s: resuming an interrupted build at image %d of %d", path, done, cache.num_images)
    else:
        if meta is not None:
            why = problem or "another key or layout"
            log.warning("feature cache %s: the unfinished build does not fit (%s); rebuilding", path, why)
        _wipe(path)
        _check_space(cache, cfg, path)
        others = [p.name for p in path.parent.iterdir() if p.is_dir() and p != path] if path.parent.is_dir() else []
        log.warning(
            "feature cache: building %s (%d images x %d views, %.2f GB)%s", path, cache.num_images, cache.views,
            cache.nbytes() / 1e9, f"; {len(others)} other cache(s) in {path.parent} (delete to free disk)" if others else "",
        )  # fmt: skip
        cache.open("w+")  # sized files (sparse until written)
        atomic_write_text(path / "meta.json", json.dumps({"key": key, "key_dict": key_dict, "layout": cache.layout},
                                                         default=str, indent=1))  # fmt: skip
    _build(cache, key, source, split, transform, encoder, cfg, device, done, progress, on_chunk)
    atomic_write_text(
        path / "complete.json",
        json.dumps({"key": key, "key_dict": key_dict, "layout": cache.layout, "bytes": cache.nbytes()},
                   default=str, indent=1),
    )  # fmt: skip
    return cache


def _wipe(path: Path) -> None:
    for p in path.iterdir():
        if p.name != ".lock":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _check_space(cache: FeatureCache, cfg: FeatureCacheConfig, path: Path) -> None:
    need = cache.nbytes()
    per_view = need / max(1, cache.num_images * cache.views)
    if need > cfg.max_gb * 1e9:
        raise ConfigError(
            f"data.feature_cache: the cache would take {need / 1e9:.2f} GB ({cache.num_images} images x "
            f"{cache.views} views x {per_view / 1e3:.0f} kB) > data.feature_cache.max_gb={cfg.max_gb:g}; lower "
            f"data.feature_cache.views, raise data.feature_cache.max_gb, or turn the cache off (data.feature_cache=null)"
        )
    free = shutil.disk_usage(path).free
    if need > free:
        raise DataError(
            f"data.feature_cache: the cache needs {need / 1e9:.2f} GB but {path} has {free / 1e9:.2f} GB free; set "
            f"data.feature_cache.dir to another disk or lower data.feature_cache.views"
        )


def _build(cache, key, source, split, transform, encoder, cfg, device, done, progress, on_chunk) -> None:
    from tqdm.auto import tqdm

    n, views = cache.num_images, cache.views
    start = time.perf_counter()
    maps = cache.open("r+")
    bar = tqdm(total=n, initial=done, desc=f"feature cache ({views} views)", unit="img", disable=not progress)
    try:
        for i0 in range(done, n, cfg.chunk):
            i1 = min(n, i0 + cfg.chunk)
            imgs, labels = [], []
            for i in range(i0, i1):
                loaded = source.load(split, i)
                for v in range(views):
                    img, lab = render_view(source, split, transform, cfg.seed, i, v, loaded)
                    imgs.append(img)
                    labels.append(lab)
            maps[B.QUERY_MASK][i0:i1] = np.stack(labels).reshape(i1 - i0, views, *cache.label_shape)
            x = torch.stack(imgs)
            outs: dict[str, list[np.ndarray]] = {t: [] for t in cache.tap_shapes}
            with torch.no_grad():
                for b0 in range(0, len(x), cfg.batch):
                    feats = encoder(x[b0 : b0 + cfg.batch].to(device))
                    for t, chunks in outs.items():
                        chunks.append(feats[t].to(torch.float16).cpu().numpy())
            for t, parts in outs.items():
                maps[t][i0:i1] = np.concatenate(parts).reshape(i1 - i0, views, *cache.tap_shapes[t])
            for m in maps.values():
                m.flush()
            atomic_write_text(cache.path / "progress.json", json.dumps({"key": key, "done": i1}))
            bar.update(i1 - i0)
            if on_chunk is not None:
                on_chunk(i1)
    finally:
        bar.close()
        del maps
    log.info("feature cache: built %s in %.1f s", cache.path, time.perf_counter() - start)
