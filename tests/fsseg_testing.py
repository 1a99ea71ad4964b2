"""Config helpers for end-to-end tests (a uniquely named module: tests/data has its own conftest)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def compose(overrides: list[str], config_name: str = "train"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fsseg.resolvers import register_resolvers

    register_resolvers()

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides, return_hydra_config=False)


def tiny_overrides(synth_root: Path, cache: Path, **extra) -> list[str]:
    """PFENet on the embedded benchmark at 64 px with a tiny budget: seconds on 2 cores."""
    over = {
        "experiment": "pfenet_effl0_synth",
        "data.source.root": str(synth_root),
        "paths.cache_dir": str(cache),
        "paths.output_dir": str(cache.parent / "outputs"),
        "encoder.weights": "none",
        "data.train_size": 64,
        "data.eval_size": 64,
        "data.batch_size": 4,
        "data.eval_batch_size": 4,
        "data.train_episodes_per_epoch": 8,
        "data.val_episodes": 8,
        "data.eval_episodes": 12,
        "head.reduce_dim": 32,
        "trainer.max_epochs": 1,
        "trainer.enable_progress_bar": False,
        "logger": "none",
    }
    over.update(extra)
    return [f"{k}={v}" if v is not None else f"~{k}" for k, v in over.items()]


class StubEncoder(nn.Module):
    """Frozen two-conv encoder at stride 1: taps "mid" and "high" at the input size (masks need no resizing)."""

    tap_channels: ClassVar[dict[str, int]] = {"mid": 6, "high": 5}

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.mid = nn.Conv2d(3, 6, 3, padding=1)
        self.high = nn.Conv2d(6, 5, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
                p.requires_grad_(False)

    def forward(self, x):
        m = torch.relu(self.mid(x))
        return {"mid": m, "high": torch.relu(self.high(m)) + 0.01}


class EncoderCalls(L.Callback):
    """Counts encoder forwards inside training, validation and test batches (and outside any batch)."""

    def __init__(self) -> None:
        self.calls = {"train": 0, "val": 0, "test": 0, "outside": 0}
        self.batches = {"train": 0, "val": 0, "test": 0}
        self.stage = "outside"
        self.handle = None

    def setup(self, trainer, pl_module, stage):
        if self.handle is None:
            self.handle = pl_module.encoder.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls[self.stage] += 1

    def _start(self, stage):
        self.stage = stage
        self.batches[stage] += 1

    def _end(self, *args, **kw):
        self.stage = "outside"

    def on_train_batch_start(self, *a, **kw):
        self._start("train")

    def on_validation_batch_start(self, *a, **kw):
        self._start("val")

    def on_test_batch_start(self, *a, **kw):
        self._start("test")

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _end
