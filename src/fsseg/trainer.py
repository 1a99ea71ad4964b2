"""The Lightning Trainer of a run, built from conf/trainer/*.yaml (``_target_: fsseg.trainer.make_trainer``).

The trainer group also carries fsseg's GPU-path switches, which are not Trainer arguments: ``compile``,
``channels_last`` and ``encoder_bf16`` are read by the model (conf/model/segmenter.yaml interpolates them) and
dropped here; ``matmul_precision`` is applied here (``torch.set_float32_matmul_precision``) when the run uses a
CUDA device - it changes fp32 matmuls on GPU only (TF32), never on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from fsseg.errors import ConfigError

MODEL_SWITCHES = ("compile", "channels_last", "encoder_bf16")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def uses_cuda(accelerator: Any) -> bool:
    """Whether a Trainer with this ``accelerator`` argument runs on CUDA on this machine."""
    name = str(accelerator).lower()
    return torch.cuda.is_available() and name in ("gpu", "cuda", "auto")


def make_trainer(matmul_precision: str | None = None, **kwargs: Any):
    import lightning as L

    for key in MODEL_SWITCHES:
        value = kwargs.pop(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"trainer.{key} must be true or false; got {value!r}")
    if matmul_precision is not None:
        if matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(
                f"trainer.matmul_precision must be one of {list(MATMUL_PRECISIONS)} or null; got {matmul_precision!r}"
            )
        if uses_cuda(kwargs.get("accelerator", "auto")):
            torch.set_float32_matmul_precision(matmul_precision)
    return L.Trainer(**kwargs)


__all__ = ["make_trainer", "uses_cuda"]
