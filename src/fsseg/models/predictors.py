"""PAHNet's prototype predictors (round2-references.md §1.5-1.7): a trained few-shot model, frozen, whose
foreground probability for the query (``M_pro``) guides a host model (PAHNet's PFE/ASC).

A predictor is an ordinary fsseg run (``fsseg-train method=ssp recipe=ssp_synth data.fold=0``, likewise pro,
hpa, rare, bam), rebuilt from the config it recorded (``config.yaml``) and the weights of its checkpoint, then
frozen: never trained, never in the optimizer, always in eval mode, run under ``torch.no_grad``. Its weights
are not written into the host's checkpoints (the host refers to the predictor run by its config).

    M_pro = softmax(out[output])[:, 1:2]      # (B, 1, h, w) at the predictor's own output resolution

`load_predictor` refuses a run made for another fold, encoder or dataset than the host's (ConfigError naming
both values) and names the command that trains a missing one; ``prerequisites=auto`` trains it first
(fsseg.prerequisites), like BAM's stage-1 base learner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fsseg.errors import ConfigError

__all__ = ["FrozenPredictor", "dataset_key", "load_predictor", "predictor_train_command"]


def dataset_key(root: Any) -> str:
    """A dataset's identity for the match check: the name of its data root directory (data/synth -> synth,
    .../VOC2012 -> VOC2012), so that the same data under another absolute path still matches."""
    return Path(os.path.normpath(str(root))).name


class FrozenPredictor(nn.Module):
    """A trained model (any module mapping an episode batch to a dict of outputs) kept frozen.

    ``output``: the name of its 2-channel (background, foreground) logits; ``output_size``: an optional fixed
    (h, w) the logits are resized to (bilinear, align_corners=True) before the softmax (SSP's reference
    interpolates its output to 64 x 64 when used as PAHNet's predictor); None: the model's own resolution.
    """

    def __init__(self, model: nn.Module, output: str = "logits", output_size: Sequence[int] | None = None) -> None:
        super().__init__()
        if output_size is not None and (len(output_size) != 2 or any(int(s) < 1 for s in output_size)):
            raise ConfigError(f"predictor.output_size must be null or [h, w] with h, w >= 1; got {output_size!r}")
        self.model = model.requires_grad_(False).eval()
        self.output = str(output)
        self.output_size = None if output_size is None else (int(output_size[0]), int(output_size[1]))

    def train(self, mode: bool = True) -> FrozenPredictor:  # always eval: BatchNorm statistics, dropout fixed
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(batch)
        if self.output not in out:
            raise ConfigError(
                f"predictor output {self.output!r} not among the predictor model's outputs {sorted(out)}; set "
                f"predictor.output to its 2-channel logits"
            )
        logits = out[self.output].float()
        if logits.dim() != 4 or logits.shape[1] != 2:
            raise ConfigError(
                f"predictor output {self.output!r} has shape {tuple(logits.shape)}; expected 2-channel logits (B, 2, h, w)"
            )
        if self.output_size is not None and tuple(logits.shape[-2:]) != self.output_size:
            logits = F.interpolate(logits, size=self.output_size, mode="bilinear", align_corners=True)
        return logits.softmax(dim=1)[:, 1:2]  # M_pro: foreground probability


def predictor_train_command(method: str, recipe: str | None, fold: int, run: str | os.PathLike) -> str:
    rec = f" recipe={recipe}" if recipe else ""
    return f"fsseg-train method={method}{rec} data.fold={fold} hydra.run.dir={run}"


def _checkpoint_path(run: Path, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        return run / "checkpoints" / f"{checkpoint}.ckpt"
    return Path(checkpoint)


def load_predictor(
    run: str | os.PathLike,
    fold: int,
    encoder: str,
    dataset: str,
    method: str,
    recipe: str | None = None,
    output: str = "logits",
    output_size: Sequence[int] | None = None,
    checkpoint: str = "best",
) -> FrozenPredictor:
    """The trained run at ``run`` (its config.yaml and checkpoint) rebuilt and frozen as a `FrozenPredictor`.

    Args:
        run: the predictor's run directory.
        fold, encoder, dataset: the host's (``data.fold``, ``encoder.name``, ``data.source.root``): the
            predictor run must have been trained on the same (ConfigError naming both values otherwise).
        method, recipe: how the predictor run is trained (named in the error when it is missing, used by
            ``prerequisites=auto``).
        output: the name of the model's 2-channel logits read as M_pro (BAM: ``meta_logits``).
        output_size: see `FrozenPredictor`.
        checkpoint: best | last | a path.
    """
    from fsseg.cli.common import instantiate
    from fsseg.runs import METRICS_FILE, check_finite_checkpoint, recorded_config

    run = Path(run)
    ckpt = _checkpoint_path(run, str(checkpoint))
    cfg = recorded_config(run)
    command = predictor_train_command(method, recipe, int(fold), run)
    if cfg is None or not ckpt.is_file():
        missing = "config.yaml" if cfg is None else str(ckpt)
        raise ConfigError(
            f"predictor {method!r}: no trained run at {run} ({missing} missing). Train it first: {command}  "
            f"(or run with prerequisites=auto)"
        )
    if checkpoint in ("best", "last") and not (run / METRICS_FILE).is_file():  # interrupted: best.ckpt of a few epochs
        raise ConfigError(
            f"predictor {method!r}: the run at {run} has not finished ({run / METRICS_FILE} missing: its training "
            f"was interrupted or is still going). Finish it: {command} resume=auto  (or run with prerequisites=auto)"
        )
    got = {
        "data.fold": cfg.get("data", {}).get("fold"),
        "encoder.name": cfg.get("encoder", {}).get("name"),
        "dataset": dataset_key(cfg.get("data", {}).get("source", {}).get("root", "")),
    }
    want = {"data.fold": int(fold), "encoder.name": str(encoder), "dataset": dataset_key(dataset)}
    wrong = [k for k in want if got[k] != want[k]]
    if wrong:
        detail = "; ".join(f"{k}: predictor run has {got[k]!r}, this run has {want[k]!r}" for k in wrong)
        raise ConfigError(f"predictor {method!r} at {run} was trained for something else ({detail}). Train the right one: {command}")
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.create(cfg["model"])
    model = instantiate(model_cfg, num_eval_classes=int(model_cfg.get("num_eval_classes", 5)))
    state = check_finite_checkpoint(ckpt)
    state = state.get("state_dict", state)
    model.load_state_dict(state, strict=True)
    return FrozenPredictor(model, output=output, output_size=output_size)
