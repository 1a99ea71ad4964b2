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


def instantiate(node, **kwargs):
    """hydra.utils.instantiate that re-raises fsseg's own input errors unwrapped, so the message a user sees is
    the one naming the option or file (Hydra wraps constructor errors in InstantiationException)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    from fsseg.errors import FsSegError

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, FsSegError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
