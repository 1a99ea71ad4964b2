"""Qualitative figures: support (mask overlaid), query, ground truth, prediction - as in the papers' figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fsseg.data import batch as B


def denormalise(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    x = img.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def overlay(img: np.ndarray, mask: np.ndarray, colour=(255, 40, 40), alpha: float = 0.5) -> np.ndarray:
    """Blend ``colour`` over pixels where mask == 1; 255 (ignore) pixels are drawn white."""
    out = img.astype(np.float32).copy()
    fg = mask == 1
    out[fg] = (1 - alpha) * out[fg] + alpha * np.array(colour, np.float32)
    out[mask == 255] = 0.6 * out[mask == 255] + 0.4 * 255
    return out.astype(np.uint8)


def episode_panels(batch, logits: torch.Tensor, mean, std, limit: int = 6, class_names: Sequence[str] = ()):
    """Rows of [support 1..K | query | ground truth | prediction] for the first ``limit`` episodes."""
    rows, titles = [], []
    pred = logits.argmax(1).cpu().numpy()
    for i in range(min(limit, logits.shape[0])):
        supports = [
            overlay(denormalise(batch[B.SUPPORT_IMGS][i, k], mean, std), batch[B.SUPPORT_MASKS][i, k].cpu().numpy())
            for k in range(batch[B.SUPPORT_IMGS].shape[1])
        ]
        query = denormalise(batch[B.QUERY_IMG][i], mean, std)
        gt = overlay(query, batch[B.QUERY_MASK][i].cpu().numpy(), colour=(40, 200, 40))
        pr = overlay(query, pred[i], colour=(40, 90, 255))
        rows.append(supports + [query, gt, pr])
        cid = int(batch[B.CLASS_ID][i])
        titles.append(class_names[cid - 1] if class_names else f"class {cid}")
    return rows, titles


def save_grid(rows, titles, path: str | Path, col_titles: Sequence[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.0 * n_cols, 2.0 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=9)
        axes[r][0].set_ylabel(titles[r], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
