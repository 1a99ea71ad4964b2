"""Model cost without training (PAHNet supplement Table 5: learnable parameters and FLOPs of a host with and
without PAHNet): the learnable parameters of a built model (frozen encoder, base learner and predictor excluded)
and the FLOPs of one evaluation episode, counted by ``torch.utils.flop_counter`` on random inputs.

FLOPs convention: ``torch.utils.flop_counter`` counts a multiply-add as 2 FLOPs; the papers' "FLOPs" (fvcore /
thop style) count it as one. ``gflops`` is therefore the counter's total / 2 / 1e9 (multiply-adds), and
``gflops_torch`` the raw total / 1e9; ``gflops_modules`` counts only convolutions and linear layers (aten
convolution / addmm / mm), what module-hook counters such as thop see (they miss batched matmuls: attention
scores, HDMNet's all-pairs cosine prior). A frozen prototype predictor runs once per episode before the host; its
share is ``predictor_gflops`` and is NOT in ``gflops`` (Table 5's +0.6 G for PAHNet cannot include an SSP
ResNet-50 forward). Train with ``count_cost=true`` (fsseg-train) to add these keys to a run's metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["episode_batch", "model_cost"]


def episode_batch(
    size: int, shots: int = 1, batch: int = 1, seed: int = 0, generator: torch.Generator | None = None,
    base_label: bool = False,
) -> dict[str, torch.Tensor]:
    """A random episode batch: images (normal noise), masks with about 40% foreground, class index 0; drawn from
    ``generator`` when given (successive batches of one stream), else from ``seed``; ``base_label`` adds a random
    query base-class label map (the base learner's training target)."""
    from fsseg.data import batch as B

    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    mask = lambda *s: (torch.rand(*s, generator=g) > 0.6).long()
    out = {
        B.QUERY_IMG: torch.randn(batch, 3, size, size, generator=g),
        B.SUPPORT_IMGS: torch.randn(batch, shots, 3, size, size, generator=g),
        B.QUERY_MASK: mask(batch, size, size),
        B.SUPPORT_MASKS: mask(batch, shots, size, size),
    }
    if base_label:
        out[B.QUERY_BASE_LABEL] = mask(batch, size, size)
    out[B.CLASS_IDX] = torch.zeros(batch, dtype=torch.long)
    return out


MODULE_OPS = ("convolution", "addmm", "mm")  # what module-hook counters (thop) see: Conv and Linear layers


def _flops(fn) -> tuple[int, int]:
    """(all counted FLOPs, those of convolutions and linear layers only)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    ops = counter.get_flop_counts().get("Global", {})
    modules = sum(int(v) for op, v in ops.items() if str(op).split(".")[1] in MODULE_OPS)
    return int(counter.get_total_flops()), modules


@torch.no_grad()
def model_cost(model: nn.Module, size: int, shots: int = 1) -> dict[str, Any]:
    """params_m (learnable parameters, millions), gflops (host, multiply-adds x 1e9, predictor excluded),
    gflops_torch (the counter's raw total for the host), predictor_gflops (multiply-adds, 0 without one),
    at one episode of ``size`` x ``size`` with ``shots`` supports, in eval mode."""
    from fsseg.models.segmenter import count_parameters

    was_training = model.training
    model.eval()
    batch = episode_batch(size, shots)
    try:
        total, total_mod = _flops(lambda: model(batch))
        predictor = getattr(model, "predictor", None)
        pred, pred_mod = _flops(lambda: predictor(batch)) if predictor is not None else (0, 0)
    finally:
        model.train(was_training)
    host = total - pred
    return {
        "params_m": count_parameters(model) / 1e6,
        "gflops": host / 2 / 1e9,
        "gflops_torch": host / 1e9,
        "gflops_modules": (total_mod - pred_mod) / 2 / 1e9,
        "predictor_gflops": pred / 2 / 1e9,
        "cost_size": int(size),
    }
