"""fsseg-eval: evaluate a training run's checkpoint on an evaluation manifest (any data/protocol overrides).

    fsseg-eval run_dir=outputs/train/pfenet/2026-11-22_10-00-00
    fsseg-eval run_dir=... checkpoint=last '+overrides={data.eval_episodes: 5000, data.eval_seed: 1}'

The model is rebuilt from the run's config.yaml and the checkpoint's state dict is loaded with
torch.load(weights_only=True). Results go to <hydra run dir>/metrics.json with provenance.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from fsseg.cli.common import config_dir, environment_defaults, report_errors, single_log_lines
from fsseg.errors import ConfigError


def load_run_config(run_dir: Path, overrides: dict[str, Any] | None = None) -> DictConfig:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"run_dir {run_dir} has no config.yaml (is it a finished fsseg-train run directory?)")
    cfg = OmegaConf.load(cfg_path)
    for key, value in (overrides or {}).items():
        top = str(key).split(".")[0]
        if top not in cfg:
            raise ConfigError(
                f"overrides: unknown key {key!r} (no {top!r} in {cfg_path}); expected one of {sorted(cfg.keys())}"
            )
        OmegaConf.update(cfg, key, value, force_add=False)
    return cfg


def resolve_checkpoint(run_dir: Path, which: str) -> Path:
    path = Path(which) if which not in ("best", "last") else run_dir / "checkpoints" / f"{which}.ckpt"
    if not path.is_file():
        from fsseg.cli.record import RECORD_FILE, is_record

        if which in ("best", "last") and is_record(run_dir):
            raise ConfigError(f"checkpoint {path} does not exist: {run_dir} is a record ({RECORD_FILE}, fsseg-record "
                              "restore), which keeps results, not weights; train the run again to evaluate it anew")
        raise ConfigError(f"checkpoint {path} does not exist (checkpoint= best | last | a path)")
    return path


def load_weights(model, ckpt: Path) -> None:
    from fsseg.runs import check_finite_checkpoint

    state = check_finite_checkpoint(ckpt)  # unreadable or non-finite: a RunError naming the file
    state = state.get("state_dict", state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]  # a frozen encoder may be rebuilt from weights
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def evaluate(run_cfg: DictConfig, ckpt: Path, trainer_cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    import lightning as L

    from fsseg import provenance
    from fsseg.cli.common import instantiate
    from fsseg.models.segmenter import metrics_from_trainer

    L.seed_everything(int(run_cfg.seed), workers=True)
    datamodule = instantiate(run_cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    model = instantiate(run_cfg.model, num_eval_classes=datamodule.num_novel_classes)
    load_weights(model, ckpt)
    # a method that takes gradients at evaluation (I2R's CAMs) trained with inference_mode=false: so it evaluates
    run_inference_mode = bool(OmegaConf.select(run_cfg, "trainer.inference_mode", default=True))
    trainer_cfg = OmegaConf.merge(
        trainer_cfg, {"inference_mode": run_inference_mode and bool(trainer_cfg.get("inference_mode", True))}
    )
    trainer = instantiate(trainer_cfg, logger=False, default_root_dir=str(out_dir), enable_checkpointing=False)
    trainer.test(model, datamodule=datamodule)
    metrics = metrics_from_trainer(trainer, "test")
    metrics["checkpoint"] = str(ckpt)  # as given (fsseg-eval may read another folder's checkpoint)
    if trainer.global_rank == 0:
        manifest = datamodule.eval_manifest
        provenance.write_run_record(
            out_dir,
            config_yaml=OmegaConf.to_yaml(run_cfg, resolve=True),
            seeds={"seed": int(run_cfg.seed), "eval_seed": int(run_cfg.data.eval_seed)},
            manifest={"hash": manifest.hash, "path": str(manifest.path), "episodes": len(manifest.episodes)},
            metrics=metrics,
        )
    return metrics


@hydra.main(version_base="1.3", config_path=None, config_name="eval")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    single_log_lines()
    with report_errors("fsseg-eval"):
        _eval_main(cfg, HydraConfig.get())


def _eval_main(cfg: DictConfig, hydra_cfg) -> None:
    run_dir = Path(cfg.run_dir)
    overrides = OmegaConf.to_container(cfg.overrides) if cfg.get("overrides") else {}
    run_cfg = load_run_config(run_dir, overrides)
    ckpt = resolve_checkpoint(run_dir, str(cfg.checkpoint))
    out_dir = Path(hydra_cfg.runtime.output_dir)
    metrics = evaluate(run_cfg, ckpt, cfg.trainer, out_dir)
    print(f"mIoU {100 * metrics['miou']:.2f}  FB-IoU {100 * metrics['fbiou']:.2f}  -> {out_dir}")


def main() -> None:
    with report_errors("fsseg-eval"):
        environment_defaults()
        sys.argv = [sys.argv[0], f"--config-dir={config_dir()}", *sys.argv[1:]]
    _hydra_main()


if __name__ == "__main__":
    main()
