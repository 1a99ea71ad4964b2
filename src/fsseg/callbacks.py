"""Lightning callbacks for non-essential work (figures, logging). Nothing here changes what a run computes.

QualitativePanels: at the end of the test epoch, a PNG grid of the first test episodes (support with its mask,
query, ground truth, prediction - the papers' qualitative figures) saved to ``<run dir>/qualitative/`` and
logged as an image to every logger that has ``log_image`` (Lightning's WandbLogger; CSVLogger has none).

LogRunConfig: the run's resolved Hydra configuration sent to every logger once (wandb: the run's config, so the
dashboard can group and filter by any key; CSV: hparams.yaml). In conf/callbacks/default.yaml.

    fsseg-train experiment=pfenet_effl0_synth callbacks=with_panels          # conf/callbacks/with_panels.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch

from fsseg.data import batch as B

__all__ = ["LogRunConfig", "QualitativePanels", "resolved_hydra_config"]

_KEYS = (B.SUPPORT_IMGS, B.SUPPORT_MASKS, B.QUERY_IMG, B.QUERY_MASK, B.CLASS_ID)


class QualitativePanels(L.Callback):
    """Save and log a grid of the first ``limit`` test episodes with the model's predictions.

    Args:
        limit: episodes (rows) in the grid.
        dirname: folder under the trainer's ``default_root_dir`` (the run directory) for the PNG.
        key: image key for the loggers (e.g. the wandb panel name).
    """

    def __init__(self, limit: int = 6, dirname: str = "qualitative", key: str = "test/qualitative"):
        super().__init__()
        if limit < 1:
            raise ValueError(f"QualitativePanels: limit must be >= 1, got {limit}")
        self.limit = int(limit)
        self.dirname = dirname
        self.key = key
        self._batch: dict[str, torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None
        self.path: Path | None = None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._batch, self._logits = None, None

    def on_test_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._batch is not None and self._batch[B.QUERY_IMG].shape[0] >= self.limit:
            return
        logits = pl_module.predict(batch).detach().float().cpu()
        part = {k: batch[k].detach().cpu() for k in _KEYS}
        if self._batch is None:
            self._batch, self._logits = part, logits
        else:  # a small eval batch size: gather until `limit` episodes
            self._batch = {k: torch.cat([self._batch[k], part[k]]) for k in _KEYS}
            self._logits = torch.cat([self._logits, logits])

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._batch is None or not trainer.is_global_zero:
            return
        from fsseg.viz import episode_panels, save_grid

        dm = trainer.datamodule
        tf = getattr(dm, "eval_transform", None)
        mean = getattr(tf, "mean", (0.485, 0.456, 0.406))
        std = getattr(tf, "std", (0.229, 0.224, 0.225))
        names = list(getattr(dm, "class_names", []) or [])
        rows, titles = episode_panels(self._batch, self._logits, mean, std, limit=self.limit, class_names=names)
        k = self._batch[B.SUPPORT_IMGS].shape[1]
        cols = [f"support {i + 1}" for i in range(k)] + ["query", "ground truth", "prediction"]
        self.path = save_grid(rows, titles, Path(trainer.default_root_dir) / self.dirname / "test_panels.png", cols)
        for logger in trainer.loggers:
            log_image = getattr(logger, "log_image", None)
            if callable(log_image):
                log_image(key=self.key, images=[str(self.path)], caption=[" | ".join(cols)])
        self._batch, self._logits = None, None


def resolved_hydra_config() -> dict | None:
    """The running fsseg-train job's configuration, resolved, from ``<output dir>/<hydra.output_subdir>/config.yaml``
    (Hydra writes it before the job starts); None outside a Hydra job or without that file."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.output_subdir is None:
            return None
        path = Path(hc.runtime.output_dir) / str(hc.output_subdir) / "config.yaml"
        if not path.is_file():
            return None
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # noqa: BLE001 - logging the config must never stop a run
        return None


class LogRunConfig(L.Callback):
    """Send the resolved run configuration to every logger (``log_hyperparams``) once, on rank 0.

    Args:
        config: the configuration to log; default: the running Hydra job's (see :func:`resolved_hydra_config`).
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = config
        self._logged = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._logged or not trainer.is_global_zero or not trainer.loggers:
            return
        cfg = self.config if self.config is not None else resolved_hydra_config()
        if not cfg:
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(cfg)
        self._logged = True
