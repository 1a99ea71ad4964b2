"""OmegaConf resolvers used by fsseg's configs; registered by the CLIs (fsseg.cli.common) and the tests.

- ``${fsseg.one_minus:x}`` = 1 - x for a loss weight x in [0, 1] (APANet's (1 - lambda), Eq. 9).
- ``${fsseg.stage1:path,fold}`` = path of a stage-1 artifact (BAM's base learner) that must exist; resolving
  it fails at once, naming the file and the command that trains it, when it does not.
"""

from __future__ import annotations

import contextlib
from typing import Any

from omegaconf import OmegaConf

from fsseg.errors import ConfigError


def _one_minus(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            "fsseg.one_minus: expected a loss weight in [0, 1] (apanet_lambda, APANet's lambda of Eq. 9); "
            f"got {value!r}"
        )
    return 1.0 - float(value)


_DEFER_STAGE1 = [False]


@contextlib.contextmanager
def stage1_deferred():
    """Within this block ``fsseg.stage1`` returns the path without checking it: for composing the configs of
    runs that are planned, not started (a sweep trains the missing stage-1 files before the runs need them)."""
    _DEFER_STAGE1.append(True)
    try:
        yield
    finally:
        _DEFER_STAGE1.pop()


def _stage1(path: Any, fold: Any) -> str:
    from pathlib import Path

    if not _DEFER_STAGE1[-1] and not Path(str(path)).is_file():
        raise ConfigError(
            f"no stage-1 base learner at {path} (needed for fold {fold}). Train it first with the same overrides "
            f"as this run plus task=base: fsseg-train task=base <this run's experiment/data/encoder overrides> "
            f"data.fold={fold}  (it writes that file)"
        )
    return str(path)


def register_resolvers() -> None:
    """Register fsseg's resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("fsseg.one_minus"):
        OmegaConf.register_new_resolver("fsseg.one_minus", _one_minus)
    if not OmegaConf.has_resolver("fsseg.stage1"):
        OmegaConf.register_new_resolver("fsseg.stage1", _stage1)
