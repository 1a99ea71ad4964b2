"""FewShotSegmenter: the one LightningModule of fsseg, composed of parts chosen by config.

    encoder (frozen)  ->  prototype head  ->  affinity decoder  ->  logits
                                                  |
                         main loss (weight) + auxiliary losses (training only, each with its weight)

A method is a config composing these parts; this module never switches on a method's name.
"""

from __future__ import annotations

import math

import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.metrics import FewShotIoU
from fsseg.models.losses import AuxLoss
from fsseg.models.ops import binary_mask, upsample_logits
from fsseg.models.optim import build_optimizer


def metrics_from_trainer(trainer, split: str = "test") -> dict[str, Any]:
    """The metrics a segmenter logged for ``split`` as a plain dict (class_iou as a list, NaN = never seen)."""
    cm = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{split}/")}
    out: dict[str, Any] = {k.split("/", 1)[1]: v for k, v in cm.items() if "/class_iou/" not in k}
    per_class = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in cm.items() if "/class_iou/" in k)
    out["class_iou"] = [v for _, v in per_class]
    if "episodes" in out:
        out["episodes"] = int(out["episodes"])
    return out


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def _build(part: Any, **kwargs: Any) -> nn.Module:
    """A part is a module, or a factory (Hydra ``_partial_``) that takes the encoder's tap channels."""
    if isinstance(part, nn.Module):
        return part
    if callable(part):
        return part(**kwargs)
    raise ConfigError(f"expected a module or a factory, got {type(part).__name__}")


class FewShotSegmenter(L.LightningModule):
    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module | Callable[..., nn.Module],
        decoder: nn.Module | Callable[..., nn.Module],
        main_loss: nn.Module,
        aux_losses: Mapping[str, AuxLoss] | None = None,
        main_loss_weight: float = 1.0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        base_lr: float = 0.0025,
        lr_multiplier: float = 1.0,
        schedule: str = "poly",
        poly_power: float = 0.9,
        param_groups: Sequence[Mapping[str, Any]] = (),
        num_eval_classes: int = 5,
        eval_resolution: str = "original",
        shot_fusion: str = "average",
        vote_k: int | None = None,
    ) -> None:
        super().__init__()
        if not (math.isfinite(base_lr) and base_lr > 0 and math.isfinite(lr_multiplier) and lr_multiplier > 0):
            raise ConfigError(
                f"optim.base_lr={base_lr} and optim.lr_multiplier={lr_multiplier}: expected finite numbers > 0"
            )
        if main_loss_weight < 0:
            raise ConfigError(f"model.main_loss_weight must be >= 0; got {main_loss_weight}")
        if schedule not in ("poly", "constant"):
            raise ConfigError(f"model.schedule must be 'poly' or 'constant'; got {schedule!r}")
        if eval_resolution not in ("original", "network"):
            raise ConfigError(f"model.eval_resolution must be 'original' or 'network'; got {eval_resolution!r}")
        if shot_fusion not in ("average", "vote"):
            raise ConfigError(f"model.shot_fusion must be 'average' or 'vote'; got {shot_fusion!r}")
        if vote_k is not None and (isinstance(vote_k, bool) or not isinstance(vote_k, int) or vote_k < 1):
            raise ConfigError(f"model.vote_k must be an integer >= 1 (k of 'v-k'); got {vote_k!r}")
        if shot_fusion == "vote" and vote_k is None:
            raise ConfigError("model.shot_fusion=vote needs model.vote_k (foreground where >= vote_k shots agree)")
        self.encoder = encoder
        tap_channels = dict(getattr(encoder, "tap_channels", {}))
        self.head = _build(head, tap_channels=tap_channels)
        self.decoder = _build(decoder)
        self.main_loss = main_loss
        self.aux_losses = nn.ModuleDict(dict(aux_losses or {}))
        self.main_loss_weight = float(main_loss_weight)
        self.optimizer_factory = optimizer or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
        self.base_lr, self.lr_multiplier = float(base_lr), float(lr_multiplier)
        self.schedule, self.poly_power = schedule, float(poly_power)
        self.param_group_cfg = [dict(g) for g in param_groups]
        self.eval_resolution = eval_resolution
        self.shot_fusion, self.vote_k = shot_fusion, vote_k
        self.val_iou = FewShotIoU(num_eval_classes)
        self.test_iou = FewShotIoU(num_eval_classes)

    # ------------------------------------------------------------------ forward
    def encode(self, batch: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """One frozen-encoder pass over the query and all supports; support taps shaped (B, K, C, h, w)."""
        q, s = batch[B.QUERY_IMG], batch[B.SUPPORT_IMGS]
        b, k = s.shape[:2]
        feats = self.encoder(torch.cat([q, s.flatten(0, 1)], dim=0))
        query = {name: f[:b] for name, f in feats.items()}
        support = {name: f[b:].view(b, k, *f.shape[1:]) for name, f in feats.items()}
        return query, support

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Logits (B, 2, h, w) at feature resolution plus the named intermediates of head and decoder."""
        query, support = self.encode(batch)
        guidance = self.head(query, support, binary_mask(batch[B.SUPPORT_MASKS]))
        out = dict(guidance)
        out["query_taps"], out["support_taps"] = query, support
        out.update(self.decoder(guidance))
        return out

    @torch.no_grad()
    def predict(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits upsampled to the network input size (B, 2, H, W); with ``shot_fusion=vote`` the vote logits."""
        if self.shot_fusion == "vote":
            return self.vote_logits(self.shot_logits(batch))
        return upsample_logits(self(batch)["logits"], batch[B.QUERY_IMG].shape[-2:])

    # K-shot voting (CELP Sec. 5.4, Table 7: "v-k"; its test_vote.py): evaluation only, any trained model.
    @torch.no_grad()
    def shot_logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One 1-shot forward per support, the K shots folded into the batch (the query repeated K times):
        logits (B, K, 2, H, W) at the network input size."""
        q, s, m = batch[B.QUERY_IMG], batch[B.SUPPORT_IMGS], batch[B.SUPPORT_MASKS]
        b, k = s.shape[:2]
        folded = {
            B.QUERY_IMG: q.repeat_interleave(k, 0),
            B.SUPPORT_IMGS: s.flatten(0, 1)[:, None],
            B.SUPPORT_MASKS: m.flatten(0, 1)[:, None],
        }
        logits = upsample_logits(self(folded)["logits"], q.shape[-2:])
        return logits.view(b, k, *logits.shape[1:])

    def vote_logits(self, shot_logits: torch.Tensor) -> torch.Tensor:
        """Per-shot logits (B, K, 2, ...) -> (B, 2, ...): each shot votes foreground where its argmax is 1; the
        pixel is foreground where >= vote_k shots vote so. Logits [0, votes - k + 0.5] give that argmax."""
        shots = shot_logits.shape[1]
        if not 1 <= self.vote_k <= shots:
            raise ConfigError(f"model.vote_k must be in [1, shots]; got vote_k={self.vote_k} with {shots} shot(s)")
        votes = shot_logits.argmax(dim=2).sum(dim=1).to(shot_logits.dtype)
        return torch.stack([torch.zeros_like(votes), votes - self.vote_k + 0.5], dim=1)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        main = self.main_loss(out["logits"], batch[B.QUERY_MASK])
        terms = {"main": main}
        loss = self.main_loss_weight * main
        for name, aux in self.aux_losses.items():
            for term, value in aux(out, batch, self).items():
                terms[f"{name}/{term}"] = value
                loss = loss + aux.weight * value
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at global step {self.global_step} "
                f"(terms: { {k: float(v.detach()) for k, v in terms.items()} }); training stopped, last good checkpoint kept"
            )
        bs = batch[B.QUERY_IMG].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    # ------------------------------------------------------------------ evaluation
    def score_logits(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at network size -> (logits, target) at the scoring resolution.

        ``original``: the content region of the padded input is mapped bilinearly onto the original label grid
        (one grid_sample for the whole batch); ``network``: the resized-and-padded label as is.
        """
        if self.eval_resolution == "network" or B.QUERY_LABEL_ORI not in batch:
            return logits, batch[B.QUERY_MASK]
        target = batch[B.QUERY_LABEL_ORI]
        hm, wm = target.shape[-2:]
        h_net, w_net = logits.shape[-2:]
        ori = batch[B.ORI_SIZE].to(logits.dtype)
        content = batch[B.CONTENT_SIZE].to(logits.dtype)
        ys = torch.arange(hm, device=logits.device, dtype=logits.dtype) + 0.5
        xs = torch.arange(wm, device=logits.device, dtype=logits.dtype) + 0.5
        # pixel centre in original coords -> network coords -> normalised [-1, 1] (align_corners=False)
        gy = (ys[None, :] * (content[:, 0:1] / ori[:, 0:1])) / h_net * 2 - 1  # B, Hm
        gx = (xs[None, :] * (content[:, 1:2] / ori[:, 1:2])) / w_net * 2 - 1  # B, Wm
        grid = torch.stack(
            [gx[:, None, :].expand(-1, hm, -1), gy[:, :, None].expand(-1, -1, wm)], dim=-1
        )  # B, Hm, Wm, 2
        mapped = F.grid_sample(logits, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return mapped, target

    def _eval_step(self, batch: Mapping[str, torch.Tensor], metric: FewShotIoU) -> None:
        if self.shot_fusion == "vote":  # vote on the scoring grid: each shot's logits mapped there first
            shots = self.shot_logits(batch)
            mapped, target = self.score_logits(batch, shots.flatten(1, 2))
            logits = self.vote_logits(mapped.unflatten(1, shots.shape[1:3]))
        else:
            logits, target = self.score_logits(batch, self.predict(batch))
        metric.update(logits, target, batch[B.CLASS_IDX])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_iou)

    def on_validation_epoch_end(self):
        self._log_metric("val", self.val_iou)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_iou)

    def on_test_epoch_end(self):
        self._log_metric("test", self.test_iou)

    def _log_metric(self, split: str, metric: FewShotIoU) -> None:
        """Log the reduced metric (states are summed across ranks by ``compute``): scalars and per-class IoU,
        so ``trainer.callback_metrics`` carries everything back, also from ``ddp_spawn`` workers."""
        values = metric.compute()
        for key in ("miou", "fbiou", "fp_rate", "fn_rate", "episodes"):
            self.log(f"{split}/{key}", float(values[key]), prog_bar=key == "miou", sync_dist=False)
        for i, v in enumerate(values["class_iou"].tolist()):
            self.log(f"{split}/class_iou/{i}", float(v), sync_dist=False)
        metric.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = []
        taken: set[str] = set()
        for cfg in self.param_group_cfg:
            pattern = re.compile(cfg["match"])
            params = [p for n, p in named if n not in taken and pattern.search(n)]
            taken.update(n for n, _ in named if pattern.search(n))
            if not params:
                raise ConfigError(f"model.param_groups: pattern {cfg['match']!r} matches no trainable parameter")
            g = {k: v for k, v in cfg.items() if k not in ("match", "lr_multiplier", "base_lr")}
            g["params"] = params
            g["lr"] = float(cfg.get("base_lr", self.base_lr)) * float(cfg.get("lr_multiplier", self.lr_multiplier))
            g.setdefault("schedule", self.schedule)
            groups.append(g)
        rest = [p for n, p in named if n not in taken]
        if rest:
            groups.insert(0, {"params": rest, "lr": self.base_lr * self.lr_multiplier, "schedule": self.schedule})
        schedules = [g.pop("schedule") for g in groups]
        for s in schedules:
            if s not in ("poly", "constant"):
                raise ConfigError(f"param group schedule must be 'poly' or 'constant'; got {s!r}")
        # a group may name its own optimizer (CyCTR: AdamW for the transformer): several -> one CompositeOptimizer
        factories = [g.pop("optimizer", None) or self.optimizer_factory for g in groups]
        opt, order = build_optimizer(groups, factories)
        schedules = [schedules[i] for i in order]
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        power = self.poly_power

        def poly(step: int) -> float:  # per-iteration poly decay: (1 - it/max_it)^power
            return max(0.0, 1.0 - step / total) ** power

        lambdas = [poly if s == "poly" else (lambda step: 1.0) for s in schedules]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fsseg_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": int(np.random.get_state()[2]),
            "python": list(random.getstate()[1]),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("fsseg_rng")
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", np.asarray(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
        random.setstate((3, tuple(rng["python"]), None))

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self.encoder, "train"):
            self.encoder.train(mode)  # a frozen encoder keeps itself in eval (its own override)
        return self


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["FewShotSegmenter", "NonFiniteLossError", "count_parameters"]
