"""fsseg-train: train a composed method, then test it on the evaluation manifest.

    fsseg-train experiment=pfenet_effl0_synth
    fsseg-train method=pfenet data=pascal encoder=resnet50 data.fold=1 data.shots=5 trainer=gpu

The run directory receives config.yaml, provenance.json (git sha, code version, versions, seeds, manifest
hash), checkpoints/{last,best}.ckpt and, written last, metrics.json. A run directory that is already finished
with the same config and code is left alone (fsseg.runs), so re-running a multirun runs only what is missing:

    fsseg-train -m experiment=apanet_effl0_synth data.fold=0,1,2,3 aux.class_agnostic.n=1,2,3 resume=auto
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fsseg.cli.common import config_dir, environment_defaults

log = logging.getLogger("fsseg.train")


def build(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None):
    """Instantiate data module, model and trainer; every config check runs here, before any training."""
    import lightning as L

    from fsseg.cli.common import instantiate

    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, num_eval_classes=datamodule.num_novel_classes)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks or [])
    loggers = build_loggers(cfg)
    if not loggers:  # an lr monitor needs a logger
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer


def build_loggers(cfg: DictConfig) -> list:
    """The configured loggers, wandb's run started now (rank 0), before any long work. If an online start fails
    (the host answers but not as wandb: a proxy, an outage, a rejected key), the run logs offline instead of
    failing, and says so; environment_defaults() has already sent runs with no key or no route offline."""
    from lightning.pytorch.loggers import WandbLogger

    from fsseg.cli.common import instantiate

    configs = list((cfg.get("logger") or {}).values())
    loggers = [instantiate(c) for c in configs]
    for i, logger in enumerate(loggers):
        if not isinstance(logger, WandbLogger) or os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
            continue
        try:
            logger.experiment  # noqa: B018 - wandb.init on rank 0 (a no-op elsewhere)
        except Exception as exc:  # noqa: BLE001 - wandb raises CommError, UsageError, timeouts...
            import wandb

            wandb.finish(exit_code=1)
            os.environ["WANDB_MODE"] = "offline"
            print(f"fsseg-train: wandb could not start online ({type(exc).__name__}: {str(exc)[:200]}); logging "
                  "offline (upload later: wandb sync <run dir>/wandb/offline-run-*)", file=sys.stderr, flush=True)  # fmt: skip
            loggers[i] = instantiate(configs[i], mode="offline")  # wandb read WANDB_MODE once, at its first init
    return loggers


def _resolve_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    if cfg.get("resume") in (None, ""):
        return None
    if cfg.resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    return str(cfg.resume)


def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train then test; returns the metrics written to run_dir/metrics.json."""
    from fsseg import provenance
    from fsseg.models.segmenter import NonFiniteLossError, metrics_from_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    (run_dir / "metrics.json").unlink(missing_ok=True)  # a re-run is not finished until it writes this again
    datamodule, model, trainer = build(cfg, run_dir, extra_callbacks)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=_resolve_resume(cfg, run_dir), weights_only=True)
    except NonFiniteLossError as err:
        last = run_dir / "checkpoints" / "last.ckpt"
        raise SystemExit(f"fsseg-train: {err}. Last good checkpoint: {last if last.exists() else 'none yet'}") from err
    metrics: dict[str, Any] = {}
    if cfg.get("test_after_fit", True):
        ckpt = _checkpoint_for_test(trainer, cfg.get("test_checkpoint", "best"))
        datamodule.setup("test")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics = metrics_from_trainer(trainer, "test")
        metrics["checkpoint"] = ckpt
    if trainer.global_rank == 0:
        manifest = datamodule.eval_manifest
        provenance.write_run_record(
            run_dir,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            seeds={"seed": int(cfg.seed), "eval_seed": int(cfg.data.eval_seed)},
            manifest={"hash": manifest.hash, "path": str(manifest.path), "episodes": len(manifest.episodes)},
            metrics=metrics,
        )
    return metrics


def _checkpoint_for_test(trainer, which: str) -> str | None:
    """Path of best.ckpt (highest val/miou) or last.ckpt written by this run's checkpoint callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    paths = {}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            key = "best" if cb.monitor else "last"
            paths[key] = cb.best_model_path or cb.last_model_path or None
    return paths.get(which) or paths.get("last") or paths.get("best")


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fsseg.runs import guard_run, skip_if_finished

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if skip_if_finished(cfg, run_dir):  # finished with this config and code: a re-run multirun skips it
        return
    with guard_run(run_dir):  # FAILED marker on error; wandb finished in every case
        metrics = run(cfg, run_dir)
    if metrics:
        print(f"test mIoU {100 * metrics['miou']:.2f}  FB-IoU {100 * metrics['fbiou']:.2f}  -> {run_dir}")


def main() -> None:
    environment_defaults()
    sys.argv = [sys.argv[0], f"--config-dir={config_dir()}", *sys.argv[1:]]
    _hydra_main()


if __name__ == "__main__":
    main()
