"""Evaluation episode manifests: drawn once, saved as JSON, identified by a content hash.

An ``EpisodeManifest`` is drawn for (dataset name + root, fold, split, shots, seed, count, min_pixels) from
the split's ``FoldIndex`` (novel classes, items where a class covers >= min_pixels pixels). Rule (HSNet/PFENet
cycle over the query images; this fixes the order):

1. Pairs P = every (query item, class) with the class qualifying in the item, for every class of the split's
   class list, ordered by item index then class id.
2. Query order: episode e belongs to pass r = e // |P| and takes P[perm_r[e mod |P|]], where perm_r is a fresh
   uniform permutation of P drawn at the start of each pass from ``default_rng([seed, 0])``. So every pair is
   used floor(count/|P|) or ceil(count/|P|) times, and a count below |P| is a uniform sample of the pairs.
3. Supports: ``shots`` distinct items drawn uniformly without replacement from the class's other qualifying
   items of the same split (never the query), from a second generator ``default_rng([seed, 1])``.
   The query sequence therefore does not depend on ``shots``: 1-shot and 5-shot manifests with the same seed
   share their queries and classes.

A class with fewer than shots + 1 qualifying images is a DataError naming it and its count.

Episodes name images by their path relative to the dataset root (``Source.item_names``), so a manifest stays
valid when the dataset moves. ``hash`` = sha256 of the canonical JSON of the episode list
``[[query, class_id, [supports...]], ...]``; it is stored in the file, verified on load (a tampered file is a
DataError), and logged with every result so two methods are compared on the same episodes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fsseg.data.folds import FoldIndex
from fsseg.data.sources import atomic_write_text
from fsseg.errors import ConfigError, DataError
from fsseg.io import sha256_bytes

FORMAT = 1
_META = ("dataset", "root", "fold", "split", "shots", "seed", "count", "min_pixels")


@dataclass(frozen=True)
class Episode:
    query: str  # image path relative to the dataset root
    class_id: int  # dataset class id (1-based)
    supports: tuple[str, ...]


def episodes_hash(episodes: Sequence[Episode]) -> str:
    canon = [[e.query, int(e.class_id), list(e.supports)] for e in episodes]
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=True)
    return sha256_bytes(text.encode("utf-8"))


class EpisodeManifest:
    """A fixed list of evaluation episodes with its provenance (see the module docstring)."""

    def __init__(
        self,
        episodes: Sequence[Episode],
        *,
        dataset: str,
        root: str,
        fold: int,
        split: str,
        shots: int,
        seed: int,
        count: int,
        min_pixels: int,
        class_ids: Sequence[int],
        path: str | Path | None = None,
    ) -> None:
        self.episodes = list(episodes)
        self.dataset, self.root, self.fold, self.split = str(dataset), str(root), int(fold), str(split)
        self.shots, self.seed = int(shots), int(seed)
        self.count, self.min_pixels = int(count), int(min_pixels)
        self.class_ids = [int(c) for c in class_ids]
        self.path = Path(path) if path is not None else None
        self.hash = episodes_hash(self.episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def __repr__(self) -> str:
        return (
            f"EpisodeManifest({self.dataset} fold {self.fold} {self.split} {self.shots}-shot "
            f"seed {self.seed}, "
            f"{len(self.episodes)} episodes, hash {self.hash[:12]})"
        )

    def meta(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _META}

    # -- drawing
    @classmethod
    def draw(
        cls,
        index: FoldIndex,
        names: Sequence[str],
        *,
        dataset: str,
        root: str,
        shots: int,
        seed: int,
        count: int,
        class_names: Sequence[str] | None = None,
    ) -> EpisodeManifest:
        if int(shots) < 1:
            raise ConfigError(f"shots={shots!r}: expected >= 1")
        if int(count) < 1:
            raise ConfigError(f"episode count={count!r}: expected >= 1")
        if len(names) != index.num_total:
            raise DataError(f"{len(names)} item names for a fold index of {index.num_total} items")
        index.require_images(int(shots) + 1, f"a {shots}-shot episode (query + {shots} distinct supports)",
                             list(class_names) if class_names else None)  # fmt: skip
        pairs = [(q, c) for q in index.items for c in index.item_classes[q]]
        if not pairs:
            raise DataError(
                f"{index.source} {index.split} fold {index.fold}: no evaluation class "
                f"(class list {index.class_ids})"
            )
        class_items = {c: np.asarray(v, dtype=np.int64) for c, v in index.class_items.items()}
        rng_q = np.random.default_rng([int(seed), 0])
        rng_s = np.random.default_rng([int(seed), 1])
        episodes: list[Episode] = []
        perm = None
        for e in range(int(count)):
            k = e % len(pairs)
            if k == 0:
                perm = rng_q.permutation(len(pairs))
            q, c = pairs[int(perm[k])]
            cands = class_items[c]
            cands = cands[cands != q]
            sup = rng_s.choice(cands, size=int(shots), replace=False)
            episodes.append(Episode(names[q], int(c), tuple(names[int(s)] for s in sup)))
        return cls(
            episodes, dataset=dataset, root=root, fold=index.fold, split=index.split, shots=shots, seed=seed,
            count=count, min_pixels=index.min_pixels, class_ids=index.class_ids,
        )  # fmt: skip

    # -- persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            **self.meta(),
            "class_ids": self.class_ids,
            "hash": self.hash,
            "episodes": [
                {"query": e.query, "class_id": e.class_id, "supports": list(e.supports)}
                for e in self.episodes
            ],
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> EpisodeManifest:
        """Read a manifest and verify its hash; any mismatch or malformed content is a DataError."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            episodes = [
                Episode(str(e["query"]), int(e["class_id"]), tuple(str(s) for s in e["supports"]))
                for e in d["episodes"]
            ]
            man = cls(episodes, **{k: d[k] for k in _META}, class_ids=d["class_ids"], path=path)
            stored = d["hash"]
        except FileNotFoundError:
            raise DataError(f"episode manifest {path} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"episode manifest {path} is malformed: {type(err).__name__}: {err}") from err
        if stored != man.hash:
            raise DataError(
                f"episode manifest {path} has been modified: its episodes hash to {man.hash}, the file "
                f"records {stored}; delete it to draw it again"
            )
        if len(man.episodes) != man.count:
            raise DataError(
                f"episode manifest {path} holds {len(man.episodes)} episodes but records count={man.count}"
            )
        return man

    @classmethod
    def load_or_create(
        cls,
        path: str | Path,
        index: FoldIndex,
        names: Sequence[str],
        *,
        dataset: str,
        root: str,
        shots: int,
        seed: int,
        count: int,
        class_names: Sequence[str] | None = None,
    ) -> EpisodeManifest:
        """Reuse the manifest saved at ``path`` (hash verified, parameters checked) or draw and save it."""
        path = Path(path)
        want = {
            "dataset": str(dataset), "root": str(root), "fold": index.fold, "split": index.split,
            "shots": int(shots), "seed": int(seed), "count": int(count), "min_pixels": index.min_pixels,
        }  # fmt: skip
        if path.is_file():
            man = cls.load(path)
            got = man.meta()
            diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
            if diff:
                raise DataError(
                    f"episode manifest {path} was drawn with different parameters (found, expected): {diff}; "
                    "delete it or use another cache_dir"
                )
            man.indices(names)  # every named image must still be in the split
            return man
        man = cls.draw(index, names, dataset=dataset, root=root, shots=shots, seed=seed, count=count,
                       class_names=class_names)  # fmt: skip
        man.save(path)
        return man

    def indices(self, names: Sequence[str]) -> list[tuple[int, int, list[int]]]:
        """Episodes as (query item index, class id, support item indices) for the split's item names."""
        pos = {n: i for i, n in enumerate(names)}
        out = []
        for e in self.episodes:
            try:
                out.append((pos[e.query], e.class_id, [pos[s] for s in e.supports]))
            except KeyError as err:
                where = f" ({self.path})" if self.path else ""
                raise DataError(
                    f"episode manifest{where} names image {err.args[0]!r}, "
                    f"which is not in the {self.split} split"
                ) from None
        return out
