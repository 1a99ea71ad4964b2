"""OmegaConf resolvers used by fsseg's configs; registered by the CLIs (fsseg.cli.common) and the tests.

- ``${fsseg.one_minus:x}`` = 1 - x for a loss weight x in [0, 1] (APANet's (1 - lambda), Eq. 9).
"""

from __future__ import annotations

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


def register_resolvers() -> None:
    """Register fsseg's resolvers with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver("fsseg.one_minus"):
        OmegaConf.register_new_resolver("fsseg.one_minus", _one_minus)
