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
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from fsseg.cli.common import config_dir, environment_defaults, report_errors, single_log_lines
from fsseg.errors import ConfigError, RunError

log = logging.getLogger("fsseg.train")


def build(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None):
    """Instantiate data module, model and trainer; every config check runs here, before any training."""
    import lightning as L

    from fsseg.callbacks import AtomicCheckpointIO, EpochSummary
    from fsseg.cli.common import instantiate

    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, **datamodule.model_args())
    if cfg.get("init_from"):
        init_from(model, Path(str(cfg.init_from)))
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks or [])
    loggers = build_loggers(cfg)
    if not loggers:  # an lr monitor needs a logger
        callbacks = [c for c in callbacks if type(c).__name__ != "LearningRateMonitor"]
    callbacks.append(EpochSummary())  # one line per epoch when the progress bar is off
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False,
                          plugins=[AtomicCheckpointIO()])  # fmt: skip
    return datamodule, model, trainer


def init_from(model, path: Path) -> None:
    """Start from another run's weights (I2R's 5-shot models start from the 1-shot ones, its supp. C): a checkpoint
    file or a run directory (its best.ckpt). Every tensor of the checkpoint must exist in the model with its shape;
    the model's tensors the checkpoint lacks (e.g. the K-shot re-weighting) keep their initialisation, named in the
    log. A resumed run takes its weights from the resume checkpoint instead."""
    from fsseg.runs import check_finite_checkpoint

    ckpt = path / "checkpoints" / "best.ckpt" if path.is_dir() else path
    if not ckpt.is_file():
        raise ConfigError(f"init_from={path}: no checkpoint there (a .ckpt file or a run directory with checkpoints/best.ckpt)")
    state = check_finite_checkpoint(ckpt)
    state = state.get("state_dict", state)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    wrong = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or wrong:
        raise ConfigError(
            f"init_from={ckpt} does not fit this model: tensors it lacks {unexpected[:5]}, shapes that differ "
            f"{[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}"
        )
    model.load_state_dict(state, strict=False)
    kept = sorted(k for k in own if k not in state and not k.startswith("encoder."))
    log.info("init_from %s: %d tensors loaded%s", ckpt, len(state), f"; kept at initialisation: {kept}" if kept else "")


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


def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train then test; returns the metrics written to run_dir/metrics.json. Every check (config values, the
    training budget, resume) runs before any long work; config.yaml is recorded before training starts."""
    from fsseg import provenance, runs
    from fsseg.models.segmenter import NonFiniteLossError, metrics_from_trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    runs.check_learning_rates(cfg)
    runs.check_training_steps(cfg)
    train = bool(cfg.get("train", True))
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    resume = runs.resume_checkpoint(cfg, run_dir, say=log.warning) if train else None
    if resume is not None and cfg.get("resume") == "auto":
        runs.check_same_config(run_dir, yaml.safe_load(config_yaml), Path(resume))
    (run_dir / "metrics.json").unlink(missing_ok=True)  # a re-run is not finished until it writes this again
    datamodule, model, trainer = build(cfg, run_dir, extra_callbacks)
    cost = None
    if cfg.get("count_cost", False):  # parameters and FLOPs of the model as built (PAHNet Table 5), before training
        from fsseg.cost import model_cost

        cost = model_cost(model, int(cfg.data.eval_size), int(cfg.data.shots))
    if trainer.global_rank == 0:
        runs.record_config(run_dir, config_yaml)  # before training: resume=auto compares with it
    if train:
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        except NonFiniteLossError as err:
            last = run_dir / "checkpoints" / "last.ckpt"
            raise RunError(f"{err}. Last good checkpoint: {last if last.exists() else 'none yet'}") from err
        if trainer.global_step == 0 and not trainer.interrupted:
            raise RunError("the run trained 0 steps (empty training set or zero batches); no metrics written")
    metrics: dict[str, Any] = {}
    if cfg.get("test_after_fit", True):
        ckpt = _checkpoint_for_test(trainer, cfg.get("test_checkpoint", "best")) if train else None
        if ckpt is not None:
            runs.check_finite_checkpoint(ckpt)
        elif runs.non_finite_tensors(model.state_dict()):
            raise RunError("the model holds non-finite weights after training; no metrics written")
        datamodule.setup("test")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics = metrics_from_trainer(trainer, "test")
        metrics["checkpoint"] = runs.relative_to_run(ckpt, run_dir)  # None: the weights as built (train=false)
        metrics["trained"] = train
    if cost is not None:
        metrics.update(cost)
    if trainer.global_rank == 0:
        manifest = datamodule.eval_manifest
        provenance.write_run_record(
            run_dir,
            config_yaml=config_yaml,
            seeds={"seed": int(cfg.seed), "eval_seed": int(cfg.data.eval_seed)},
            manifest={"hash": manifest.hash, "path": str(manifest.path), "episodes": len(manifest.episodes)},
            metrics=metrics,
        )
    return metrics


def _checkpoint_for_test(trainer, which: str) -> str | None:
    """Path of best.ckpt (highest val/miou) or last.ckpt of this run's checkpoint callbacks, in their own folder
    (never a path recorded by a copied or moved run directory); None when none was written."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    paths = {}
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            key = "best" if cb.monitor else "last"
            recorded = cb.best_model_path or cb.last_model_path
            if recorded and cb.dirpath:
                path = Path(cb.dirpath) / Path(recorded).name
                paths[key] = str(path) if path.is_file() else None
    return paths.get(which) or paths.get("last") or paths.get("best")


@hydra.main(version_base="1.3", config_path=None, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from fsseg.runs import guard_run, skip_if_finished

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    single_log_lines()
    with report_errors("fsseg-train"):
        from fsseg.resolvers import stage1_deferred

        with stage1_deferred():  # a finished run's stage-1 file is not needed to know it is finished
            finished = skip_if_finished(cfg, run_dir)
        if finished:  # finished with this config and code: a re-run multirun skips it
            return
        if cfg.get("prerequisites") == "auto":  # train a missing stage-1 file first (sweeps, multirun)
            from fsseg.prerequisites import ensure_prerequisites

            with stage1_deferred():
                plain = OmegaConf.to_container(cfg, resolve=False)
                plain["base_learner_path"] = cfg.get("base_learner_path")
                if cfg.get("predictor") is not None:  # the predictor run's directory, resolved
                    plain["predictor"] = OmegaConf.to_container(cfg.predictor, resolve=True)
            ensure_prerequisites(list(HydraConfig.get().overrides.task), plain)
        with guard_run(run_dir):  # FAILED marker on error; wandb finished in every case
            metrics = run(cfg, run_dir)
    if metrics:
        fb = f"  FB-IoU {100 * metrics['fbiou']:.2f}" if "fbiou" in metrics else ""
        print(f"test mIoU {100 * metrics['miou']:.2f}{fb}  -> {run_dir}")


def main() -> None:
    with report_errors("fsseg-train"):
        environment_defaults()
        sys.argv = [sys.argv[0], f"--config-dir={config_dir()}", *sys.argv[1:]]
    _hydra_main()


if __name__ == "__main__":
    main()
