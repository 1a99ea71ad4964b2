"""Run-directory rules of fsseg-train and fsseg-eval: what a run records at its start, when it may resume, which
checkpoints it may trust.

- ``config.yaml`` (the resolved config) is written when a run starts, before any training; ``resume=auto``
  compares it with the config of the new invocation and refuses a different one, naming the keys
  (where the run lives, its logger and ``resume`` itself are not compared).
- A checkpoint is trusted only if it loads and every floating tensor of its state dict is finite; an unreadable
  ``last.ckpt`` is moved aside and the run resumes from ``best.ckpt`` or from scratch (one line says which).
- Paths recorded in results are relative to the run directory, so a copied or moved run stays usable.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fsseg.errors import ConfigError, RunError

CONFIG_FILE = "config.yaml"
# not compared on resume: where the run lives, how it is logged, which table it serves, the resume request
_NOT_COMPARED_ON_RESUME = ("run_dir", "sweep_name", "logger", "resume")


def check_learning_rates(cfg: Mapping) -> None:
    """Every learning rate of ``optim`` finite and > 0, named by option (NaN, inf, 0 and negatives refused)."""
    optim = cfg.get("optim") or {}
    pairs = [(f"optim.{k}", optim.get(k)) for k in ("base_lr", "lr_multiplier")]
    for i, group in enumerate(optim.get("param_groups") or []):
        pairs += [(f"optim.param_groups[{i}].{k}", group.get(k)) for k in ("base_lr", "lr_multiplier") if k in group]
    for name, value in pairs:
        try:
            ok = value is not None and math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{name}={value!r}: expected a finite number > 0")


def check_training_steps(cfg: Mapping) -> None:
    """A training run must train: zero epochs, steps or batches are refused unless ``train=false`` asks for
    evaluation only."""
    if not cfg.get("train", True):
        return
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and value == 0:
            raise ConfigError(
                f"trainer.{key}={value}: the run would train nothing and record an untrained model as finished; "
                "expected >= 1 (for evaluation only, set train=false, or run fsseg-eval on a trained run directory)"
            )
    episodes = (cfg.get("data") or {}).get("train_episodes_per_epoch")
    if episodes is not None and int(episodes) == 0:
        raise ConfigError("data.train_episodes_per_epoch=0: the run would train nothing; expected >= 1 or null")


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU; a corrupt or foreign file is a RunError naming it."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, unpickling error, EOF...
        raise RunError(f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).split('. ')[0][:120]})") from err
    if not isinstance(ckpt, dict):
        raise RunError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating tensors of a state dict that hold NaN or +-inf."""
    import torch

    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``; a RunError if it is unreadable or any weight is non-finite."""
    ckpt = load_checkpoint(path)
    bad = non_finite_tensors(ckpt.get("state_dict", ckpt))
    if bad:
        raise RunError(
            f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {', '.join(bad[:3])}); "
            "no metrics are written from it (lower optim.base_lr, or resume from an earlier checkpoint)"
        )
    return ckpt


def relative_to_run(path: str | os.PathLike | None, run_dir: Path) -> str | None:
    """``path`` relative to the run directory when it lies inside it (results stay valid when the run moves)."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------------ resume
def record_config(run_dir: Path, config_yaml: str) -> None:
    from fsseg.io import write_text_atomic

    write_text_atomic(run_dir / CONFIG_FILE, config_yaml)


def check_same_config(run_dir: Path, current: Mapping, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` when the config recorded in ``run_dir`` differs from ``current``."""
    from fsseg.sweeps import computed_config, config_diff, recorded_config

    recorded = recorded_config(run_dir)
    if recorded is None:
        return  # a run of an fsseg that recorded its config at the end: nothing to compare with
    a = computed_config(recorded, _NOT_COMPARED_ON_RESUME)
    b = computed_config(current, _NOT_COMPARED_ON_RESUME)
    diff = config_diff(a, b)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunError(
            f"resume=auto: {run_dir / CONFIG_FILE} was recorded with another config than this one ({shown}); "
            f"{checkpoint.name} would continue the old weights under the new values. Use a new run directory, "
            "or repeat the recorded values"
        )


def resume_checkpoint(cfg: Mapping, run_dir: Path, say: Callable[[str], None] = print) -> str | None:
    """The checkpoint ``cfg.resume`` asks for. ``auto``: this run directory's last.ckpt if any; an unreadable
    or non-finite one is moved aside and best.ckpt (if good) or nothing (from scratch) is used instead."""
    resume = cfg.get("resume")
    if resume in (None, ""):
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file (expected a .ckpt path or 'auto')")
        return str(resume)
    folder = run_dir / "checkpoints"
    last = folder / "last.ckpt"
    if not last.is_file():
        return None
    try:
        check_finite_checkpoint(last)
        return str(last)
    except RunError as err:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = folder / f"last.corrupt-{stamp}.ckpt"
        os.replace(last, aside)
        best = folder / "best.ckpt"
        fallback = None
        if best.is_file():
            try:
                check_finite_checkpoint(best)
                fallback = best
            except RunError:
                pass
        then = f"resuming from {fallback.name}" if fallback else "starting from scratch"
        say(f"{err}; moved to {aside.name}, {then}")
        return str(fallback) if fallback else None
