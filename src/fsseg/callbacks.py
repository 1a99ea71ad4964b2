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

__all__ = [
    "AtomicCheckpointIO",
    "EpochSummary",
    "LogRunConfig",
    "QualitativePanels",
    "RunCSVLogger",
    "RunCheckpoint",
    "resolved_hydra_config",
]

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


# ------------------------------------------------------------------------------------- run-directory files
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO saving through :func:`fsseg.io.write_atomic`: a kill or a full disk
    never leaves a partial ``.ckpt`` under its final name (fsseg-train passes it as a trainer plugin)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        import io

        from fsseg.io import write_atomic

        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options")
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        write_atomic(path, buf.getvalue())


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved state names its files relative to its folder, so a copied or moved run
    directory resumes with its own checkpoints (Lightning's stores absolute paths: a copy would test, and on a
    new best delete, the original's best.ckpt; a move would forget best_model_score)."""

    _PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for k in self._PATH_KEYS:
            state[k] = Path(state[k]).name if state.get(k) else state.get(k)
        state["best_k_models"] = {Path(p).name: v for p, v in (state.get("best_k_models") or {}).items()}
        state["dirpath"] = "."  # relative to the run directory's checkpoints/ folder
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        here = Path(self.dirpath) if self.dirpath else None
        if state_dict.get("dirpath") == "." and here is not None:  # written by state_dict() above: rebase
            state = dict(state_dict, dirpath=self.dirpath)
            for k in self._PATH_KEYS:
                state[k] = str(here / state[k]) if state.get(k) else state.get(k)
            state["best_k_models"] = {str(here / p): v for p, v in (state.get("best_k_models") or {}).items()}
            state_dict = state
        super().load_state_dict(state_dict)


class EpochSummary(L.Callback):
    """One log line per epoch with its metrics (train loss, validation mIoU...) when there is no progress bar
    (every sweep profile), so a log shows how a run went."""

    def __init__(self) -> None:
        super().__init__()
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # after validation
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        import logging
        import time

        values = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        keep = [k for k in sorted(values) if k == "train/loss" or (k.startswith("val/") and k.count("/") == 1)]
        shown = "  ".join(f"{k} {values[k]:.4f}" for k in keep if not k.endswith("episodes"))
        logging.getLogger("fsseg.train").info(
            "epoch %d/%s  step %d  %s  (%.0f s)", trainer.current_epoch + 1, trainer.max_epochs,
            trainer.global_step, shown, time.monotonic() - self._start,
        )  # fmt: skip


class _AppendingWriter(ExperimentWriter):
    """CSV writer that keeps the rows already in metrics.csv (a resumed run) and rewrites the file atomically.
    The rows a killed attempt logged after its last checkpoint (steps >= the first step logged now) are
    dropped, so a resumed run's CSV has each step once."""

    def __init__(self, log_dir: str) -> None:
        import csv

        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self.log_dir = log_dir
        self.metrics_file_path = str(Path(log_dir) / self.NAME_METRICS_FILE)
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, Any]] = []
        self._trimmed = False
        if Path(self.metrics_file_path).is_file():
            with open(self.metrics_file_path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = list(reader.fieldnames or [])
                self._rows = list(reader)

    def log_hparams(self, params: dict[str, Any]) -> None:
        import yaml

        from fsseg.io import write_text_atomic
        from fsseg.provenance import to_jsonable

        self.hparams.update(params)
        write_text_atomic(Path(self.log_dir) / self.NAME_HPARAMS_FILE, yaml.safe_dump(to_jsonable(self.hparams)))

    def save(self) -> None:
        import csv
        import io

        from fsseg.io import write_text_atomic

        if not self.metrics:
            return
        if not self._trimmed:
            first = min(int(m["step"]) for m in self.metrics)
            self._rows = [r for r in self._rows if not (str(r.get("step", "")).isdigit() and int(r["step"]) >= first)]
            self._trimmed = True
        self._rows += self.metrics
        self.metrics = []
        self.metrics_keys = sorted(set(self.metrics_keys).union(*self._rows))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text_atomic(self.metrics_file_path, buf.getvalue())


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger (``<run dir>/csv/metrics.csv``) that a resumed run appends to instead of
    deleting, writing through :func:`fsseg.io.write_atomic` (conf/logger/csv.yaml)."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
