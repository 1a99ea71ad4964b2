"""Several optimizers stepped as one, for parameter groups that name their own optimizer.

CyCTR trains its transformer with AdamW (constant lr 1e-4) and everything else with SGD + poly decay
(shared/notes/baselines.md §4). Lightning's automatic optimisation wants ONE optimizer (and one closure per
step), so ``CompositeOptimizer`` wraps the sub-optimizers: ``step`` runs the closure once and then steps every
sub-optimizer; ``zero_grad``, ``state_dict`` and ``load_state_dict`` delegate. Its ``param_groups`` are the
sub-optimizers' own group dicts (the same objects), so an lr scheduler built on the composite sets the lr that
the sub-optimizers use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fsseg.errors import ConfigError


class CompositeOptimizer(torch.optim.Optimizer):
    """One optimizer made of several (disjoint parameter sets). Exact resume: ``state_dict`` holds every
    sub-optimizer's state dict, in order; ``load_state_dict`` restores them and re-links the group dicts."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if len(optimizers) < 2:
            raise ValueError("CompositeOptimizer needs at least two optimizers")
        self.optimizers = list(optimizers)
        # the sub-optimizers' group dicts themselves (Optimizer.add_param_group appends the dict it is given)
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})

    def _relink(self) -> None:
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:  # Lightning's closure: forward + backward, run once for all sub-optimizers
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if states is None or len(states) != len(self.optimizers):
            raise ValueError(
                f"CompositeOptimizer state has {None if states is None else len(states)} sub-optimizer states, "
                f"this optimizer has {len(self.optimizers)}: the checkpoint comes from another parameter-group config"
            )
        for opt, state in zip(self.optimizers, states):
            opt.load_state_dict(state)
        self._relink()  # Optimizer.load_state_dict replaces the group dicts


def _factory_key(factory: Callable) -> Any:
    """Two configs that build the same optimizer (equal Hydra partials) share one optimizer."""
    if isinstance(factory, functools.partial):
        return (factory.func, factory.args, repr(sorted(factory.keywords.items())))
    return id(factory)


def build_optimizer(
    groups: Sequence[dict[str, Any]], factories: Sequence[Callable[..., torch.optim.Optimizer]]
) -> tuple[torch.optim.Optimizer, list[int]]:
    """One optimizer per distinct factory (called as ``factory(groups, lr=first group's lr)``), composed if there
    are several. Returns it and ``order``: the index in ``groups`` of each of its param_groups, in order."""
    if len(groups) != len(factories) or not groups:
        raise ConfigError("build_optimizer: one factory per parameter group, and at least one group")
    buckets: dict[Any, list[int]] = {}
    for i, factory in enumerate(factories):
        if not callable(factory):
            raise ConfigError(f"model.param_groups[*].optimizer must be an optimizer factory; got {factory!r}")
        buckets.setdefault(_factory_key(factory), []).append(i)
    optimizers = [factories[idx[0]]([groups[i] for i in idx], lr=groups[idx[0]]["lr"]) for idx in buckets.values()]
    order = [i for idx in buckets.values() for i in idx]
    return (optimizers[0] if len(optimizers) == 1 else CompositeOptimizer(optimizers)), order


__all__ = ["CompositeOptimizer", "build_optimizer"]
