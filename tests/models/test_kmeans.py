"""Batched cosine k-means against scikit-learn's KMeans on L2-normalised features, and its edge cases."""

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from fsseg.errors import ConfigError
from fsseg.models.kmeans import cosine_kmeans, grid_partition


def _separated(b: int, c: int, h: int, w: int, k: int, seed: int, noise: float = 0.05):
    """Feature maps (B, C, h, w) whose pixels come from k well-separated directions (random scale per pixel);
    returns the maps and the true labels (B, h*w)."""
    g = torch.Generator().manual_seed(seed)
    maps, truth = [], []
    for _ in range(b):
        dirs = torch.nn.functional.normalize(torch.randn(k, c, generator=g), dim=1)
        lab = torch.randint(0, k, (h * w,), generator=g)
        lab[:k] = torch.arange(k)  # every cluster present
        scale = 0.5 + 2 * torch.rand(h * w, 1, generator=g)  # cosine ignores the norm
        x = (dirs[lab] + noise * torch.randn(h * w, c, generator=g)) * scale
        maps.append(x.T.reshape(c, h, w))
        truth.append(lab)
    return torch.stack(maps), torch.stack(truth)


def _sklearn_labels(x: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> list[np.ndarray]:
    out = []
    for i in range(x.shape[0]):
        feats = torch.nn.functional.normalize(x[i].flatten(1).T, dim=1)
        if mask is not None:
            feats = feats[mask[i].flatten()]
        out.append(KMeans(n_clusters=k, n_init=10, random_state=0).fit(feats.numpy()).labels_)
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_same_partition_as_sklearn_on_separated_data(k):
    x, truth = _separated(b=4, c=24, h=9, w=7, k=k, seed=k)
    res = cosine_kmeans(x, k, iters=10, generator=torch.Generator().manual_seed(0))
    assert res.labels.shape == (4, 9, 7) and res.centres.shape == (4, k, 24) and res.counts.shape == (4, k)
    ours = res.labels.flatten(1).numpy()
    for i, ref in enumerate(_sklearn_labels(x, k)):
        assert adjusted_rand_score(ref, ours[i]) == 1.0  # same partition up to a permutation of labels
        assert adjusted_rand_score(truth[i].numpy(), ours[i]) == 1.0
    assert torch.allclose(res.centres.norm(dim=2), torch.ones(4, k), atol=1e-5)
    assert res.counts.sum(dim=1).tolist() == [63] * 4


def test_objective_close_to_sklearn_on_overlapping_data():
    # no clear structure: both are local optima; ours should not be much worse than sklearn's best of 10
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(3, 16, 10, 10, generator=g))
    res = cosine_kmeans(x, 3, iters=10, generator=torch.Generator().manual_seed(1))
    for i, ref in enumerate(_sklearn_labels(x, 3)):
        f = torch.nn.functional.normalize(x[i].flatten(1).T, dim=1)

        def cost(labels, f=f):
            lab = torch.as_tensor(labels)
            return sum(((f[lab == j] - f[lab == j].mean(0)) ** 2).sum().item() for j in lab.unique())

        assert cost(res.labels[i].flatten()) <= 1.15 * cost(ref)


def test_mask_excludes_pixels():
    x, _truth = _separated(b=2, c=12, h=6, w=6, k=3, seed=7)
    mask = torch.ones(2, 6, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, :, :3] = False
    # poison the excluded pixels: if they took part they would form their own cluster
    x = x.clone()
    x[0, :, :2] = 100.0
    x[1, :, :, :3] = -100.0
    res = cosine_kmeans(x, 3, mask=mask, generator=torch.Generator().manual_seed(0))
    assert (res.labels[~mask] == -1).all() and (res.labels[mask] >= 0).all()
    assert res.counts.sum(dim=1).tolist() == [24, 18]
    for i, ref in enumerate(_sklearn_labels(x, 3, mask)):
        assert adjusted_rand_score(ref, res.labels[i][mask[i]].numpy()) == 1.0


def test_more_clusters_than_distinct_features():
    # image 0: one distinct direction (all pixels identical up to scale); image 1: two directions
    x = torch.zeros(2, 4, 3, 3)
    x[0, 0] = torch.arange(1, 10, dtype=torch.float32).view(3, 3)
    x[1, 1, :, :2] = 1.0
    x[1, 2, :, 2] = 2.0
    res = cosine_kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.centres).all()
    assert res.counts[0].tolist() == [9, 0, 0, 0]  # duplicates lose the tie to the lowest index
    assert sorted(res.counts[1].tolist()) == [0, 0, 3, 6]
    lab1 = res.labels[1]
    assert len(lab1[:, :2].unique()) == 1 and len(lab1[:, 2].unique()) == 1 and lab1[0, 0] != lab1[0, 2]


def test_all_pixels_excluded_and_zero_features():
    x = torch.randn(2, 5, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[1] = True
    x[1] = 0.0  # all-zero features: cosine 0 everywhere, cluster 0, no NaN
    res = cosine_kmeans(x, 3, mask=mask, generator=torch.Generator().manual_seed(0))
    assert (res.labels[0] == -1).all() and res.counts[0].tolist() == [0, 0, 0]
    assert (res.labels[1] == 0).all() and res.counts[1].tolist() == [16, 0, 0]
    assert torch.isfinite(res.centres).all()


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (1, 3)])
def test_tiny_maps(size):
    h, w = size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, h, w, generator=g)
    res = cosine_kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    assert res.labels.shape == (3, h, w) and (res.labels >= 0).all()
    assert res.counts.sum(dim=1).tolist() == [h * w] * 3
    if h * w >= 3:  # three random directions in 6-D: each pixel its own cluster
        assert all(len(res.labels[i].unique()) == 3 for i in range(3))
    one = cosine_kmeans(x, 1)
    assert (one.labels == 0).all() and torch.isfinite(one.centres).all()


def test_deterministic_given_seed_and_a_fixed_point():
    x = torch.relu(torch.randn(3, 8, 7, 7, generator=torch.Generator().manual_seed(5)))
    a = cosine_kmeans(x, 4, generator=torch.Generator().manual_seed(11))
    b = cosine_kmeans(x, 4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centres, b.centres)
    xs, _ = _separated(b=2, c=10, h=6, w=6, k=3, seed=2, noise=0.2)
    res = cosine_kmeans(xs, 3, iters=10, generator=torch.Generator().manual_seed(0))
    # converged: every pixel is closest to the normalised mean of its own cluster
    f = torch.nn.functional.normalize(xs.flatten(2), dim=1)  # B, C, N
    lab = res.labels.flatten(1)
    means = torch.stack([torch.stack([f[i][:, lab[i] == j].mean(1) for j in range(3)]) for i in range(2)])
    means = torch.nn.functional.normalize(means, dim=2)
    assert torch.equal(torch.einsum("bkc,bcn->bkn", means, f).argmax(1), lab)


def test_bad_arguments():
    x = torch.randn(1, 3, 2, 2)
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ConfigError, match="n_clusters"):
            cosine_kmeans(x, bad)
    with pytest.raises(ConfigError, match="iters"):
        cosine_kmeans(x, 2, iters=-1)
    with pytest.raises(ValueError, match="mask"):
        cosine_kmeans(x, 2, mask=torch.ones(1, 3, 3, dtype=torch.bool))


def test_grid_partition():
    assert grid_partition(4, 4, 2).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    g = grid_partition(5, 7, 3)
    assert g.shape == (5, 7) and sorted(g.unique().tolist()) == list(range(9))
    assert (grid_partition(3, 3, 1) == 0).all()
    assert len(grid_partition(2, 2, 4).unique()) == 4  # more bins than pixels: the rest are empty
    for bad in (0, -2, 1.5):
        with pytest.raises(ConfigError, match="bins"):
            grid_partition(4, 4, bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, _ = _separated(b=4, c=32, h=12, w=12, k=3, seed=9)
    cpu = cosine_kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    gpu = cosine_kmeans(x.cuda(), 3, generator=torch.Generator().manual_seed(0))
    assert gpu.labels.device.type == "cuda"
    assert torch.equal(cpu.labels, gpu.labels.cpu())
