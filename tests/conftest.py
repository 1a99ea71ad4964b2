"""Shared fixtures: a small embedded benchmark generated once per session, and composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["WANDB_MODE"] = "disabled"

@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small embedded benchmark (VOC layout) shared by the end-to-end tests."""
    from fsseg.data.synth import main as synth_main

    root = tmp_path_factory.mktemp("synth") / "synth"
    synth_main(["--out", str(root), "--seed", "0", "--train", "120", "--val", "120", "--workers", "1"])
    return root
