"""Runs that need another run's product first (BAM's stage-2 needs its fold's stage-1 base learner).

A run config names such a product by ``base_learner_path`` (conf/recipe/bam_*.yaml) or by ``predictor.run`` (a
frozen predictor run, conf/predictor); the run that makes the first
is the same composition with ``task=base``. `ensure_prerequisites` trains what is missing before a run starts
and never retrains an existing file (stage 2 checks that the file fits: fold, encoder, classes). Sweeps call it
before every run; a plain ``fsseg-train`` of stage 2 without the file stops at once naming the command instead.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["ensure_prerequisites", "predictor_overrides", "stage1_overrides"]

# run-specific overrides that do not describe what stage 1 computes (its seed is the recipe's default: every
# stage-2 seed shares one stage-1 file, whichever runs first)
_RUN_ONLY = ("seed", "resume", "run_dir", "hydra.", "sweep_", "+sweep_", "logger", "test_checkpoint", "tags")


def stage1_overrides(overrides: Sequence[str], run_dir: str | Path) -> list[str]:
    keep = [o for o in overrides if not o.lstrip("+~").startswith(_RUN_ONLY)]
    return [*keep, "task=base", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]


# what a predictor run shares with its host: dataset, fold, encoder, paths, where it runs (not the host's method,
# recipe or any model setting: the predictor's own method and recipe define it)
_PREDICTOR_KEEP = ("data=", "data.fold=", "data.source", "encoder=", "paths.", "trainer=", "trainer.accelerator=",
                   "trainer.devices=", "trainer.precision=")  # fmt: skip


def predictor_overrides(overrides: Sequence[str], predictor: Mapping) -> list[str]:
    """The fsseg-train overrides of the run a host's predictor (conf/predictor) reads."""
    keep = [o for o in overrides if o.lstrip("+~").startswith(_PREDICTOR_KEEP)]
    own = [f"method={predictor['method']}"] + ([f"recipe={predictor['recipe']}"] if predictor.get("recipe") else [])
    # prerequisites=auto: a predictor that is itself a stage-2 run (BAM) trains its own stage 1 first;
    # resume=auto: a predictor run interrupted part way (a killed sweep) continues from its last.ckpt
    return [*own, *keep, f"hydra.run.dir={predictor['run']}", "prerequisites=auto", "resume=auto",
            "trainer.enable_progress_bar=false"]  # fmt: skip


def _predictor_missing(predictor: Mapping) -> bool:
    """No usable predictor yet: no checkpoint, or (for best/last) a run that never finished — an interrupted run
    holds a best.ckpt of its first epochs, which must not pass for the trained predictor."""
    from fsseg.runs import METRICS_FILE

    run = Path(str(predictor["run"]))
    which = str(predictor.get("checkpoint") or "best")
    if which not in ("best", "last"):
        return not ((run / "config.yaml").is_file() and Path(which).is_file())
    ckpt = run / "checkpoints" / f"{which}.ckpt"
    return not ((run / "config.yaml").is_file() and ckpt.is_file() and (run / METRICS_FILE).is_file())


def _ensure_predictor(overrides: Sequence[str], predictor: Mapping, runner: Callable[[list[str]], None]) -> list[Path]:
    """Train the predictor run a host names (``predictor.run``) when it has no checkpoint yet."""
    import fcntl

    run = Path(str(predictor["run"]))
    if not _predictor_missing(predictor):
        return []
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(run.parent / f".{run.name}.lock", "w") as lock:  # parallel hosts of one fold train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _predictor_missing(predictor):
            return []
        runner(predictor_overrides(overrides, predictor))
    if _predictor_missing(predictor):
        raise RuntimeError(f"the predictor run ended without a checkpoint or metrics.json in {run} (see {run}/train.log)")
    return [run]


def _fsseg_train(overrides: list[str]) -> None:
    exe = Path(sys.executable).with_name("fsseg-train")
    cmd = [str(exe) if exe.exists() else "fsseg-train", *overrides]
    subprocess.run(cmd, check=True)


def ensure_prerequisites(
    overrides: Sequence[str], cfg: Mapping, runner: Callable[[list[str]], None] = _fsseg_train
) -> list[Path]:
    """Train the stage-1 file and the predictor run a run config needs when they are missing; returns what was
    trained (files / run directories)."""
    trained: list[Path] = []
    predictor = cfg.get("predictor")
    if isinstance(predictor, Mapping) and predictor.get("run") and predictor.get("method"):
        trained += _ensure_predictor(overrides, predictor, runner)
    return trained + _ensure_stage1(overrides, cfg, runner)


def _ensure_stage1(overrides: Sequence[str], cfg: Mapping, runner: Callable[[list[str]], None]) -> list[Path]:
    path = cfg.get("base_learner_path")
    if not path or cfg.get("task_name") == "base":
        return []
    path = Path(str(path))
    if path.is_file() and not _smoke_file_for_a_full_run(path, cfg):
        return []
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:  # parallel jobs of one fold train it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            if not (smoke := _smoke_file_for_a_full_run(path, cfg)):
                return []
            print(f"prerequisites: {path} was written by a smoke run ({smoke}); this run is not one: training stage 1 "
                  "again over it", flush=True)  # fmt: skip
        run_dir = path.parent / "runs" / path.stem
        runner(stage1_overrides(overrides, run_dir))
    if not path.is_file() or _smoke_file_for_a_full_run(path, cfg):
        raise RuntimeError(f"stage 1 finished without writing a full {path} (see {run_dir}/train.log)")
    return [path]


def _smoke_file_for_a_full_run(path: Path, cfg: Mapping) -> str:
    """The smoke budget a stage-1 file records (``meta.trained``) when the run asking for it has a full one ('' else;
    files without the record — converted checkpoints, older files — count as full)."""
    import pickle

    import torch

    from fsseg.runs import limited_training

    trainer = cfg.get("trainer") or {}
    if limited_training(trainer.get("limit_train_batches"), trainer.get("fast_dev_run")):
        return ""
    try:
        trained = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["meta"].get("trained") or {}
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, AttributeError):
        # unreadable: stage 2's loader names the problem
        return ""
    if not limited_training(trained.get("limit_train_batches"), trained.get("fast_dev_run")):
        return ""
    return ", ".join(f"{k}={v}" for k, v in trained.items())
