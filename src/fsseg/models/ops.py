"""Shared tensor operations of few-shot segmentation, vectorised over the batch.

Every method builds on these; each lives here once. Shapes: B batch, K shots, C channels, h x w feature size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data.batch import IGNORE_INDEX

MAP_EPS = 5e-4  # PFENet/SCCAN masked-average-pooling epsilon (area + 0.0005)


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """A region where autocast is OFF on ``device``'s type (``.float()`` alone does not stop autocast: a matmul
    of fp32 inputs still runs in bf16 under ``torch.autocast``) and, on CUDA, fp32 matmuls are full fp32 even
    where ``torch.set_float32_matmul_precision("high")`` (TF32) is set. Used around the computations that must
    stay fp32 under bf16 mixed precision: cosine k-means, CELP's similarity threshold at delta, the priors.
    Outside autocast on CPU it changes nothing (fp32 runs are bit-identical). Callers still cast their inputs
    with ``.float()`` (a bf16 encoder's taps stay bf16 otherwise)."""
    kind = torch.device(device).type
    with contextlib.ExitStack() as stack:
        if kind in ("cpu", "cuda", "xpu", "mps") and torch.amp.is_autocast_available(kind):
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        previous = torch.get_float32_matmul_precision()
        if kind == "cuda" and previous != "highest":
            torch.set_float32_matmul_precision("highest")
            stack.callback(torch.set_float32_matmul_precision, previous)
        yield


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor (e.g. numbers drawn from a CPU ``torch.Generator``) on ``device`` without blocking the host:
    pinned + ``non_blocking`` on CUDA (the values, hence the random stream, are unchanged); a no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str = "bilinear") -> torch.Tensor:
    """Bilinear resize with align_corners=True, as in the references; identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=tuple(size), mode="nearest")
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


def binary_mask(mask: torch.Tensor) -> torch.Tensor:
    """{0,1,255} int mask -> float {0,1}; 255 (ignore/padding) counts as not-foreground."""
    return (mask == 1).to(torch.float32)


def mask_to_feature(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) binary float mask -> (..., 1, h, w) soft mask at feature size (bilinear, as the references)."""
    lead = mask.shape[:-2]
    m = mask.reshape(-1, 1, *mask.shape[-2:])
    m = resize(m, size)
    return m.reshape(*lead, 1, *size)


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = MAP_EPS) -> torch.Tensor:
    """Masked average pooling: sum(f * m) / (sum(m) + eps).  feat (N, C, h, w), mask (N, 1, h, w) -> (N, C)."""
    num = (feat * mask).sum(dim=(-2, -1))
    den = mask.sum(dim=(-2, -1)) + eps
    return num / den


def cosine_similarity_map(query: torch.Tensor, support: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Cosine similarity of every query position with every support position.

    query (B, C, hq, wq), support (B, C, hs, ws) -> (B, hq*wq, hs*ws).
    """
    q = query.flatten(2).transpose(1, 2)  # B, Nq, C
    s = support.flatten(2)  # B, C, Ns
    sim = torch.bmm(q, s)
    qn = q.norm(dim=2, keepdim=True)
    sn = s.norm(dim=1, keepdim=True)
    return sim / (qn * sn + eps)


def minmax_normalise(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample min-max normalisation over all non-batch dimensions."""
    flat = x.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(x)


def max_cosine_prior(query_high: torch.Tensor, support_high: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
    """PFENet's training-free prior (PFENet Sec. 3.2): for every query position, the maximum cosine similarity
    to any masked support position, min-max normalised per image.

    query_high (B, C, h, w); support_high (B, K, C, h, w); support_mask (B, K, 1, h, w) soft.
    Returns (B, 1, h, w): the K per-shot priors averaged.
    """
    return shot_priors(query_high, support_high, support_mask).mean(dim=1)


def shot_priors(query_high: torch.Tensor, support_high: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
    """`max_cosine_prior` per shot, not averaged: (B, K, 1, h, w) (BAM weights the shots' priors)."""
    b, k, _, h, w = support_high.shape
    with full_precision(query_high.device):  # fp32 under bf16 autocast too (a prior, issue 13 item 3)
        s = (support_high.float() * support_mask.float()).flatten(0, 1)  # B*K, C, h, w
        q = query_high.float().unsqueeze(1).expand(-1, k, -1, -1, -1).flatten(0, 1)
        prior = cosine_similarity_map(q, s).max(dim=2).values.view(b * k, 1, h, w)
        return minmax_normalise(prior).view(b, k, 1, h, w)


def gram_matrix(feat: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Channel-by-channel cosine similarity of a feature map (BAM's Gram matrix): (N, C, h, w) -> (N, C, C)."""
    with full_precision(feat.device):  # at least fp32 under bf16 autocast too
        f = (feat.float() if feat.dtype in (torch.float16, torch.bfloat16) else feat).flatten(2)
        n = f.norm(dim=2, keepdim=True)
        return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(n, n.transpose(1, 2)) + eps)


def scene_difference(query_low: torch.Tensor, support_low: torch.Tensor) -> torch.Tensor:
    """BAM's estimate of how much query and support scenes differ: ||G_q - G_s||_F / ||1_{CxC}||_F per shot.

    query_low (B, C, h, w), support_low (B, K, C, h', w') -> (B, K); ||1_{CxC}||_F = C.
    """
    b, k, c = support_low.shape[:3]
    gq = gram_matrix(query_low)  # B, C, C
    gs = gram_matrix(support_low.flatten(0, 1)).view(b, k, c, c)
    return (gq.unsqueeze(1) - gs).flatten(2).norm(dim=2) / c


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at feature size -> input size (bilinear, align_corners=True as the references)."""
    return resize(logits, size)


def valid_pixels(target: torch.Tensor) -> torch.Tensor:
    return target != IGNORE_INDEX


def choose_uniform(valid: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of one entry per row chosen uniformly among the valid ones (B, n) bool, from the uniforms u (B,) in
    [0, 1) (APANet's random negative region, CELP's anchor). Rows with no valid entry get 0."""
    n_valid = valid.sum(dim=1)
    rank = (u * n_valid).floor().long().clamp(min=0)
    rank = torch.minimum(rank, (n_valid - 1).clamp(min=0))  # u -> 1 rounding guard
    order = valid.long().cumsum(dim=1) - 1  # rank of each valid entry among the valid ones
    hit = valid & (order == rank.unsqueeze(1))
    return hit.long().argmax(dim=1)


class SeededModule(nn.Module):
    """A module drawing from its own ``self.generator`` (torch.Generator): the generator's state travels in
    checkpoints (``get_extra_state``), so a resumed run draws the same numbers as an uninterrupted one."""

    generator: torch.Generator

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if state and "generator" in state:
            self.generator.set_state(state["generator"].cpu())

