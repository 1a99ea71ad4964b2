"""Episode datasets: training episodes sampled on the fly, evaluation episodes read from a manifest.

Both yield dicts with the keys of :mod:`fsseg.data.batch`.

Training (``TrainEpisodes``, PFENet's sampler): the dataset has ``length`` positions (default: one per query
candidate, i.e. per training image with >= 1 qualifying base class). The ``EpisodeSampler`` walks an endless
stream of passes over the query candidates, each pass a fresh seeded permutation, and hands the dataset a
code ``serial * n + position`` (n = number of query candidates); the dataset decodes the query position and
seeds a numpy Generator with ``(seed, serial, position)``. From it: the target class uniformly among the
query's qualifying base classes, then K supports uniformly among that class's other qualifying images
(distinct, never the query), then the augmentation of the query and of each support (independent draws).
An episode is thus a pure function of (seed, epoch, position): the same whichever worker or rank runs it,
with or without persistent workers, and resumable (Lightning calls ``set_epoch`` on the sampler, also
through its distributed wrapper). Indexing the dataset directly with 0..len-1 gives serial = position // n.

Masks: the query/support masks are binary for the target class (1), everything else 0, 255 kept;
``QUERY_BASE_LABEL`` keeps base-class ids, sets novel classes (and background) to 0, keeps 255. Masks are
built before the spatial transform and transformed with the image (nearest), so padding is 255 in all.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from fsseg.data import batch as B
from fsseg.data.folds import FoldIndex
from fsseg.data.manifest import EpisodeManifest
from fsseg.data.sources import Source
from fsseg.data.transforms import EvalTransform, TrainTransform, mask_tensor
from fsseg.errors import DataError

log = logging.getLogger(__name__)


def binary_mask(label: np.ndarray, class_id: int, ignore_index: int | None = B.IGNORE_INDEX) -> np.ndarray:
    """uint8 mask: 1 where ``label == class_id``, 255 where ``label == ignore_index``, else 0."""
    out = (label == class_id).astype(np.uint8)
    if ignore_index is not None:
        out[label == ignore_index] = B.IGNORE_INDEX
    return out


def require_class(label: np.ndarray, class_id: int, source: Source, split: str, item: int, role: str) -> None:
    """DataError naming the label file when an episode's query or support holds no pixel of the episode's class
    (a label edited after the fold index was built): never a silent empty mask."""
    if not (label == class_id).any():
        path = source.items(split)[item][1]
        raise DataError(
            f"label {path} ({role} of a class-{class_id} episode) holds no pixel of class {class_id}; the label "
            "changed after the fold index and episode manifest were built. Run again: the cache key follows the "
            "labels' sizes and mtimes (a label restored with its old size and mtime needs cache_dir removed)"
        )


def base_label(
    label: np.ndarray, base_ids: Sequence[int], ignore_index: int | None = B.IGNORE_INDEX
) -> np.ndarray:
    """Label restricted to base classes: base ids kept, every other id -> 0, ``ignore_index`` -> 255."""
    lut = np.zeros(int(max(int(label.max(initial=0)), B.IGNORE_INDEX)) + 1, dtype=label.dtype)
    ids = np.asarray([c for c in base_ids if c < lut.size], dtype=np.int64)
    lut[ids] = ids
    if ignore_index is not None:
        lut[ignore_index] = B.IGNORE_INDEX
    return lut[label]


class EpisodeSampler(Sampler[int]):
    """Seeded shuffling sampler for ``TrainEpisodes`` (see the module docstring); call ``set_epoch``."""

    def __init__(self, num_queries: int, length: int, seed: int = 0) -> None:
        if num_queries < 1 or length < 1:
            raise DataError(f"no training episodes: {num_queries} query images, {length} episodes per epoch")
        self.n, self.length, self.seed, self.epoch = int(num_queries), int(length), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        n = self.n
        start = self.epoch * self.length
        perm, perm_pass = None, -1
        for serial in range(start, start + self.length):
            p, k = divmod(serial, n)
            if p != perm_pass:
                perm, perm_pass = np.random.default_rng([self.seed, p]).permutation(n), p
            yield serial * n + int(perm[k])


class TrainEpisodes(Dataset):
    """On-the-fly training episodes over a training ``FoldIndex`` (classes = the fold's base classes)."""

    def __init__(
        self,
        source: Source,
        index: FoldIndex,
        shots: int,
        transform: TrainTransform,
        seed: int = 0,
        length: int | None = None,
    ) -> None:
        if not index.items:
            raise DataError(
                f"{index.source} {index.split} fold {index.fold}: no training image has a base class with "
                f">= {index.min_pixels} pixels"
            )
        self.source, self.index, self.transform = source, index, transform
        self.shots, self.seed = int(shots), int(seed)
        self.split = index.split
        self.length = int(length) if length else len(index.items)
        self.base_ids = list(index.class_ids)
        self._class_idx = {c: k for k, c in enumerate(self.base_ids)}
        self._class_items = {c: np.asarray(v, dtype=np.int64) for c, v in index.class_items.items()}
        purpose = f"a {self.shots}-shot training episode (query + {self.shots} supports)"
        index.require_images(self.shots + 1, purpose, source.class_names, allow_empty=True)
        unused = [c for c in index.class_ids if not index.class_items.get(c)]
        if unused:
            log.warning(
                "%s %s fold %d: base class(es) %s have no image with >= %d pixels: never a training target",
                index.source, index.split, index.fold, unused, index.min_pixels,
            )  # fmt: skip

    def __len__(self) -> int:
        return self.length

    def draw(self, code: int) -> tuple[int, int, list[int], np.random.Generator]:
        """(query item, class id, support items, generator for the augmentation) of episode ``code``."""
        n = len(self.index.items)
        serial, pos = divmod(int(code), n)
        rng = np.random.default_rng([self.seed, serial, pos])
        q = self.index.items[pos]
        classes = self.index.item_classes[q]
        c = classes[int(rng.integers(len(classes)))]
        cands = self._class_items[c]
        cands = cands[cands != q]
        sup = rng.choice(cands, size=self.shots, replace=False)
        return q, c, [int(s) for s in sup], rng

    def __getitem__(self, code: int) -> dict[str, torch.Tensor]:
        q, c, sup, rng = self.draw(code)
        ign = self.source.ignore_index
        img, label = self.source.load(self.split, q)
        require_class(label, c, self.source, self.split, q, "query")
        masks = [binary_mask(label, c, ign), base_label(label, self.base_ids, ign)]
        q_img, (q_mask, q_base) = self.transform(img, masks, rng)
        s_imgs, s_masks = [], []
        for s in sup:
            simg, slab = self.source.load(self.split, s)
            require_class(slab, c, self.source, self.split, s, "support")
            t_img, (t_mask,) = self.transform(simg, [binary_mask(slab, c, ign)], rng)
            s_imgs.append(t_img)
            s_masks.append(t_mask)
        return {
            B.QUERY_IMG: q_img,
            B.QUERY_MASK: q_mask,
            B.SUPPORT_IMGS: torch.stack(s_imgs),
            B.SUPPORT_MASKS: torch.stack(s_masks),
            B.CLASS_ID: torch.tensor(c, dtype=torch.int64),
            B.CLASS_IDX: torch.tensor(self._class_idx[c], dtype=torch.int64),
            B.QUERY_BASE_LABEL: q_base,
        }


class CachedTrainEpisodes(TrainEpisodes):
    """``TrainEpisodes`` read from a feature cache (``data.feature_cache``; :mod:`fsseg.data.feature_cache`).

    The episode (query, class, supports) is drawn exactly as ``TrainEpisodes.draw`` does; then the query and
    each support pick one of the cache's V views, uniformly, from the episode's generator. The sample holds
    the views' taps (``QUERY_TAP`` / ``SUPPORT_TAP`` keys, float16) instead of images, and the masks derived
    from the views' stored labels. The memory maps open lazily in each process (DataLoader workers).
    """

    def __init__(self, source: Source, index: FoldIndex, shots: int, transform: TrainTransform, cache,
                 seed: int = 0, length: int | None = None) -> None:  # fmt: skip
        super().__init__(source, index, shots, transform, seed=seed, length=length)
        n = len(source.item_names(self.split))
        if cache.num_images != n:
            raise DataError(f"feature cache {cache.path} holds {cache.num_images} images; {index.source} "
                            f"{self.split} has {n}")  # fmt: skip
        self.cache = cache

    def __getitem__(self, code: int) -> dict[str, torch.Tensor]:
        q, c, sup, rng = self.draw(code)
        views = rng.integers(self.cache.views, size=1 + self.shots)
        items = np.asarray([q, *sup], dtype=np.int64)
        labels = self.cache.labels(items, views)  # uint8 (1 + K, S, S), 255 = ignore / padding
        masks = mask_tensor(binary_mask(labels, c, B.IGNORE_INDEX))
        taps = self.cache.taps(items, views)
        out = {
            B.QUERY_MASK: masks[0],
            B.SUPPORT_MASKS: masks[1:],
            B.CLASS_ID: torch.tensor(c, dtype=torch.int64),
            B.CLASS_IDX: torch.tensor(self._class_idx[c], dtype=torch.int64),
            B.QUERY_BASE_LABEL: mask_tensor(base_label(labels[0], self.base_ids, B.IGNORE_INDEX)),
        }
        for t, f in taps.items():
            out[B.QUERY_TAP + t] = f[0]
            out[B.SUPPORT_TAP + t] = f[1:]
        return out


class EvalEpisodes(Dataset):
    """Evaluation episodes of a manifest; ``class_ids``: the split's (novel) class list, for ``CLASS_IDX``."""

    def __init__(
        self,
        source: Source,
        manifest: EpisodeManifest,
        class_ids: Sequence[int],
        base_ids: Sequence[int],
        transform: EvalTransform,
    ) -> None:
        self.source, self.manifest, self.transform = source, manifest, transform
        self.split = manifest.split
        self.class_ids = [int(c) for c in class_ids]
        self.base_ids = [int(c) for c in base_ids]
        self._class_idx = {c: k for k, c in enumerate(self.class_ids)}
        self.episodes = manifest.indices(source.item_names(self.split))
        unknown = sorted({c for _, c, _ in self.episodes} - set(self._class_idx))
        if unknown:
            raise DataError(
                f"episode manifest {manifest.path} uses class(es) {unknown} outside {self.class_ids}"
            )

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, e: int) -> dict[str, torch.Tensor]:
        q, c, sup = self.episodes[e]
        ign = self.source.ignore_index
        img, label = self.source.load(self.split, q)
        require_class(label, c, self.source, self.split, q, "query")
        q_bin = binary_mask(label, c, ign)
        q_img, (q_mask, q_base), content = self.transform(img, [q_bin, base_label(label, self.base_ids, ign)])
        s_imgs, s_masks = [], []
        for s in sup:
            simg, slab = self.source.load(self.split, s)
            require_class(slab, c, self.source, self.split, s, "support")
            t_img, (t_mask,), _ = self.transform(simg, [binary_mask(slab, c, ign)])
            s_imgs.append(t_img)
            s_masks.append(t_mask)
        return {
            B.QUERY_IMG: q_img,
            B.QUERY_MASK: q_mask,
            B.SUPPORT_IMGS: torch.stack(s_imgs),
            B.SUPPORT_MASKS: torch.stack(s_masks),
            B.CLASS_ID: torch.tensor(c, dtype=torch.int64),
            B.CLASS_IDX: torch.tensor(self._class_idx[c], dtype=torch.int64),
            B.QUERY_BASE_LABEL: q_base,
            B.QUERY_LABEL_ORI: mask_tensor(q_bin),
            B.ORI_SIZE: torch.tensor(label.shape[:2], dtype=torch.int64),
            B.CONTENT_SIZE: torch.tensor(content, dtype=torch.int64),
            B.EPISODE_IDX: torch.tensor(e, dtype=torch.int64),
        }


def collate_episodes(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack episode dicts; ``QUERY_LABEL_ORI`` is padded bottom/right with 255 to the batch's largest."""
    out: dict[str, torch.Tensor] = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if key == B.QUERY_LABEL_ORI:
            h = max(v.shape[0] for v in vals)
            w = max(v.shape[1] for v in vals)
            padded = torch.full((len(vals), h, w), B.IGNORE_INDEX, dtype=torch.int64)
            for k, v in enumerate(vals):
                padded[k, : v.shape[0], : v.shape[1]] = v
            out[key] = padded
        else:
            out[key] = torch.stack(vals)
    return out


def seed_worker(seed: int, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bind ``seed`` with functools.partial): seeds the global RNGs of each
    worker from the run seed and the worker id (episode sampling itself uses its own seeded generators)."""
    s = np.random.SeedSequence([int(seed), int(worker_id)]).generate_state(2)
    np.random.seed(int(s[0]))
    random.seed(int(s[1]))
    torch.manual_seed(int(s[0]) << 32 | int(s[1]))


class ShardedEvalSampler(DistributedSampler):
    """Evaluation episodes split across DDP ranks with no padding: rank r takes episodes r, r + W, r + 2W, ...

    Lightning's default DistributedSampler repeats episodes so every rank gets the same count, which would
    score some episodes twice. Being a DistributedSampler, Lightning leaves this one in place; every episode
    is scored exactly once and the metric states (sums) are reduced across ranks. Outside DDP: all episodes.
    """

    def __init__(self, num_episodes: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.n = int(num_episodes)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # order is fixed by the manifest
        pass
