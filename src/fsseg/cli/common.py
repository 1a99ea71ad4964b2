"""Helpers shared by the command-line entry points: config discovery, environment defaults, run records."""

from __future__ import annotations

import os
from pathlib import Path

from fsseg.errors import ConfigError
from fsseg.resolvers import register_resolvers

register_resolvers()


def config_dir() -> str:
    """The conf/ directory: $FSSEG_CONF, else ./conf, else the repository's conf/ next to src/ (editable install)."""
    candidates = [os.environ.get("FSSEG_CONF"), str(Path.cwd() / "conf"), str(Path(__file__).resolve().parents[3] / "conf")]
    for c in candidates:
        if c and (Path(c) / "train.yaml").is_file():
            return str(Path(c).resolve())
    raise ConfigError(
        "cannot find fsseg's conf/ directory (looked at $FSSEG_CONF, ./conf and the source checkout); "
        "run from the repository root or set FSSEG_CONF"
    )


def environment_defaults() -> None:
    """Offline-safe defaults: no albumentations update check; wandb offline unless a key is configured."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
