"""Partitions of feature maps into regions, batched over images: cosine (spherical) k-means and the SPP grid.

Both return integer label maps (B, *spatial) with -1 for pixels that belong to no region, the format APANet's
class-agnostic branch (fsseg.models.apanet) turns into region masks.

`cosine_kmeans` solves APANet/SCNet Eq. 4 (k-means under the cosine distance) for every image of a batch at
once: no Python loop over images or pixels (only over the <= n initial seeds and the fixed iteration count),
no scikit-learn, CPU and CUDA alike.

- Distance: 1 - cos. Centres are unit vectors: the normalised mean of the unit-normalised member features
  (spherical k-means). The unit-normalised copy of the features is never materialised: the assignment only
  needs <centre, x> (the argmax over centres does not depend on |x|) and the update folds 1/|x| into the
  assignment weights, so each iteration reads the features twice (two batched matmuls).
- Initialisation: k-means++ under the cosine distance (first seed uniform among the valid pixels, each next
  seed drawn with probability proportional to the squared distance to the nearest chosen seed). The uniform
  numbers come from ``generator`` (a CPU ``torch.Generator``; the draws are moved to the features' device),
  so a seeded generator gives the same partition on CPU and CUDA and across runs. Without a generator the
  global CPU RNG is used.
- Iterations: an assignment to the seeds, then up to ``iters`` rounds of (update, assign) - the paper's
  "10 rounds". On CPU the loop stops early at a fixed point (no label changed in any image of the batch), where
  further rounds would reproduce the same centres and labels bit for bit, so the result equals that of all
  ``iters`` rounds. On other devices (``early_stop=None``) it always runs the ``iters`` rounds: the fixed-point
  test is a host-device synchronisation per round, which a CUDA-graph-friendly training step avoids; the result
  is the same (the rounds after a fixed point repeat it exactly). Labels are those of the final centres.
- Precision: the whole computation runs in fp32 with autocast disabled (``ops.full_precision``): under bf16
  autocast a matmul of fp32 inputs would run in bf16 and change the labels of ~5% of the pixels.
- Ties (equal cosine to several centres, e.g. duplicated seeds or all-zero features): the lowest centre index
  wins (strict comparison, as torch.argmax).
- Empty clusters: a cluster that receives no valid pixel keeps its previous centre (deterministic; it may
  stay empty). When an image has fewer distinct features than clusters, k-means++ runs out of positive
  distances and the remaining seeds are drawn uniformly among the valid pixels, i.e. some centres coincide;
  the tie rule then leaves the higher-indexed copies empty. ``counts`` reports the members of each cluster.
- Masked-out pixels (``mask`` False) are neither seeds nor members and get label -1. An image with no valid
  pixel gets labels all -1, counts all 0 and arbitrary (but finite, deterministic) centres.
- Pixels with an all-zero feature have cosine 0 to every centre: they go to cluster 0 and add nothing to any
  centre's direction (they do count as members).

`grid_partition` is APANet's spatial-pyramid-pooling alternative (Table VII): a x a equal bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fsseg.errors import ConfigError
from fsseg.models.ops import full_precision, to_device

_NORM_EPS = 1e-12


@dataclass(frozen=True)
class KMeansResult:
    """labels (B, *spatial) int64 in [0, n) or -1 (masked out); centres (B, n, C) unit-norm float32;
    counts (B, n) int64 number of (valid) member pixels."""

    labels: torch.Tensor
    centres: torch.Tensor
    counts: torch.Tensor


def _check_clusters(n_clusters: object, iters: object) -> None:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ConfigError(f"cosine_kmeans: n_clusters must be an integer >= 1; got {n_clusters!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ConfigError(f"cosine_kmeans: iters must be an integer >= 0; got {iters!r}")


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws from a CPU generator (or the global CPU RNG), moved to ``device`` (float64) without blocking."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return to_device(u, device)


def _sample_index(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, an index drawn with probability proportional to ``weights`` (B, N) >= 0, by inverse CDF with the
    uniforms ``u`` (B,). Rows whose weights are all zero give index N - 1 (callers avoid that case)."""
    cdf = weights.to(torch.float64).cumsum(dim=1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_(max=weights.shape[1] - 1)


def _project(centres: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """<centre_k, x_i> for every image: centres (B, m, C), x (B, C, N) -> (B, m, N)."""
    return torch.bmm(centres, x)


def _member_sums(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_ki x_i for every image: x (B, C, N), weights (B, m, N) -> (B, m, C) (x @ w^T, the fast layout)."""
    return torch.bmm(x, weights.transpose(1, 2)).transpose(1, 2)


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """argmax over dim 1 of (B, n, N), the lowest index winning ties; a loop over the n <= few rows is 10-20x
    faster on CPU than torch.argmax over a short strided dim."""
    best, idx = scores[:, 0], torch.zeros_like(scores[:, 0], dtype=torch.long)
    for k in range(1, scores.shape[1]):
        better = scores[:, k] > best
        best = torch.where(better, scores[:, k], best)
        idx = torch.where(better, torch.full_like(idx, k), idx)
    return idx


def _gather_unit(x: torch.Tensor, inv_norm: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Unit-normalised features at pixel indices idx (B, m) -> (B, m, C)."""
    b, c, _ = x.shape
    picked = x.gather(2, idx.unsqueeze(1).expand(b, c, idx.shape[1]))  # B, C, m
    return picked.transpose(1, 2) * inv_norm.gather(1, idx).unsqueeze(2)


def _kmeanspp_seeds(
    x: torch.Tensor, inv_norm: torch.Tensor, valid: torch.Tensor, n: int, generator: torch.Generator | None
) -> torch.Tensor:
    """k-means++ seeds under the cosine distance, batched: (B, n, C) unit vectors."""
    b = x.shape[0]
    u = _uniform((b, n), generator, x.device)
    validf = valid.to(torch.float64)
    idx = _sample_index(validf, u[:, 0])
    seeds = [_gather_unit(x, inv_norm, idx[:, None])[:, 0]]  # B, C
    dmin = None
    for k in range(1, n):
        cos = _project(seeds[-1].unsqueeze(1), x).squeeze(1) * inv_norm  # B, N
        d = (1.0 - cos).clamp_(min=0.0)
        dmin = d if dmin is None else torch.minimum(dmin, d)
        w = dmin.to(torch.float64).square() * validf
        # no positive distance left (fewer distinct features than clusters): uniform among the valid pixels
        exhausted = w.sum(dim=1, keepdim=True) <= 0
        w = torch.where(exhausted, validf, w)
        idx = _sample_index(w, u[:, k])
        seeds.append(_gather_unit(x, inv_norm, idx[:, None])[:, 0])
    return torch.stack(seeds, dim=1)


def cosine_kmeans(
    features: torch.Tensor,
    n_clusters: int,
    iters: int = 10,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    early_stop: bool | None = None,
) -> KMeansResult:
    """Cosine k-means of every image's pixels: features (B, C, *spatial), mask (B, *spatial) bool (True = take
    part) or None. ``early_stop``: stop at a fixed point (a host sync per round); None = on CPU only. See the
    module docstring for initialisation, ties and empty clusters."""
    _check_clusters(n_clusters, iters)
    if features.dim() < 3:
        raise ValueError(f"cosine_kmeans: features must be (B, C, *spatial); got shape {tuple(features.shape)}")
    b, c = features.shape[:2]
    spatial = features.shape[2:]
    if early_stop is None:
        early_stop = features.device.type == "cpu"
    with torch.no_grad(), full_precision(features.device):
        x = features.detach().float().reshape(b, c, -1).contiguous()  # B, C, N (a view for contiguous float32)
        npix = x.shape[2]
        if mask is None:
            valid = torch.ones(b, npix, dtype=torch.bool, device=x.device)
        else:
            if tuple(mask.shape) != (b, *spatial):
                raise ValueError(f"cosine_kmeans: mask must be {(b, *spatial)}; got {tuple(mask.shape)}")
            valid = mask.reshape(b, npix).to(device=x.device, dtype=torch.bool)
        norm = torch.linalg.vector_norm(x, dim=1)  # B, N
        inv_norm = torch.where(norm > 0, 1.0 / norm.clamp_min(_NORM_EPS), torch.zeros_like(norm))  # zero stays zero
        weight = inv_norm * valid  # update weight of each pixel: 1/|x| if valid, else 0
        n = n_clusters
        none = torch.full((b, npix), -1, dtype=torch.long, device=x.device)
        if n == 1:
            centres = F.normalize(_member_sums(x, weight.unsqueeze(1)), dim=2, eps=_NORM_EPS)  # B, 1, C
            labels = torch.where(valid, torch.zeros_like(none), none)
        else:
            centres = _kmeanspp_seeds(x, inv_norm, valid, n, generator)
            labels = torch.where(valid, _first_argmax(_project(centres, x)), none)  # B, N
            for _ in range(iters):
                # update: normalised sum of the unit-normalised members; an empty cluster keeps its centre
                w = torch.zeros(b, n, npix, dtype=x.dtype, device=x.device)
                w.scatter_(1, labels.clamp(min=0)[:, None], weight[:, None])
                members = torch.zeros(b, n, dtype=x.dtype, device=x.device)
                members.scatter_add_(1, labels.clamp(min=0), valid.to(x.dtype))
                new = F.normalize(_member_sums(x, w), dim=2, eps=_NORM_EPS)
                centres = torch.where((members > 0).unsqueeze(2), new, centres)
                # assign
                new_labels = torch.where(valid, _first_argmax(_project(centres, x)), none)
                converged = early_stop and torch.equal(new_labels, labels)
                labels = new_labels
                if converged:  # a fixed point: further rounds would reproduce these centres and labels exactly
                    break
        counts = torch.zeros(b, n, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, labels.clamp(min=0), valid.to(torch.long))
    return KMeansResult(labels=labels.view(b, *spatial), centres=centres, counts=counts)


def grid_partition(height: int, width: int, bins: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Spatial-pyramid-pooling regions (APANet Table VII): an a x a grid of near-equal bins over an h x w map.

    Returns (h, w) int64 labels row-major in [0, a*a): pixel (y, x) -> (y * a // h) * a + (x * a // w).
    With a > h (or w) some bins have no pixel (empty regions).
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ConfigError(f"grid_partition: bins must be an integer >= 1; got {bins!r}")
    ys = torch.arange(height, device=device) * bins // height
    xs = torch.arange(width, device=device) * bins // width
    return ys[:, None] * bins + xs[None, :]


__all__ = ["KMeansResult", "cosine_kmeans", "grid_partition"]
