"""Batched cosine k-means (fsseg.models.kmeans) against a per-image scikit-learn KMeans loop on the same inputs.

    fsseg-bench kmeans                         # B = 8: 60x60x2048 (473 px, ResNet layer4) and 16x16x320 (embedded)
    fsseg-bench kmeans --clusters 5 --repeats 7 --data clustered

Both sides do what a training step would: the torch side calls ``cosine_kmeans`` on the (B, C, h, w) map; the
scikit-learn side L2-normalises each image's pixels, moves them to NumPy and fits
``KMeans(n_clusters, n_init=1, max_iter=iters)`` (k-means++ seeding as ours, its default tol) image by image.
Inputs: ``random`` = ReLU of Gaussian noise (no structure: both run all iterations, the worst case) or
``clustered`` = pixels drawn around a few directions (both converge early). Times are the minimum over
``--repeats`` interleaved runs after a warm-up (the machine may be shared); the ratio is sklearn / torch.
"""

from __future__ import annotations

import argparse
import time

import torch

from fsseg.models.kmeans import cosine_kmeans

SIZES = {"resnet473": (60, 60, 2048), "embedded": (16, 16, 320)}


def make_features(batch: int, h: int, w: int, c: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.relu(torch.randn(batch, c, h, w, generator=g))
    dirs = torch.relu(torch.randn(batch, 4, c, generator=g))
    lab = torch.randint(0, 4, (batch, h * w), generator=g)
    x = torch.gather(dirs, 1, lab[..., None].expand(-1, -1, c)) + 0.3 * torch.rand(batch, h * w, c, generator=g)
    return x.transpose(1, 2).reshape(batch, c, h, w).contiguous()


def sklearn_loop(x: torch.Tensor, clusters: int, iters: int, seed: int = 0) -> list:
    from sklearn.cluster import KMeans

    out = []
    for i in range(x.shape[0]):
        feats = torch.nn.functional.normalize(x[i].flatten(1).T, dim=1).numpy()
        out.append(KMeans(n_clusters=clusters, n_init=1, max_iter=iters, random_state=seed).fit(feats).labels_)
    return out


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", choices=["random", "clustered"], default="random")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"B={args.batch} n={args.clusters} iters={args.iters} data={args.data} torch threads={threads}")
    for name in args.sizes:
        h, w, c = SIZES[name]
        x = make_features(args.batch, h, w, c, args.data)
        gen = torch.Generator().manual_seed(0)
        cosine_kmeans(x, args.clusters, args.iters, generator=gen)  # warm-up
        sklearn_loop(x[:1], args.clusters, args.iters)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both sides
            ours += _time(lambda x=x, gen=gen: cosine_kmeans(x, args.clusters, args.iters, generator=gen), 1)
            theirs += _time(lambda x=x: sklearn_loop(x, args.clusters, args.iters), 1)
        t_ours, t_theirs = min(ours), min(theirs)
        median = sorted(theirs)[len(theirs) // 2] / sorted(ours)[len(ours) // 2]
        print(
            f"{name:10s} {h}x{w}x{c}: batched torch {1e3 * t_ours:8.1f} ms | per-image sklearn {1e3 * t_theirs:8.1f} ms"
            f" | sklearn/torch = {t_theirs / t_ours:5.1f}x (median {median:.1f}x)"
        )


if __name__ == "__main__":
    main()
