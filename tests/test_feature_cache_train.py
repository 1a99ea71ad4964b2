"""fsseg-train with data.feature_cache: training steps read cached taps (no encoder call), evaluation runs the
encoder on the original images; a second run reuses the cache; a part that reads images is refused."""

from __future__ import annotations

import json

import pytest
from fsseg_testing import EncoderCalls, compose, tiny_overrides
from torch import nn

from fsseg.cli.train import run
from fsseg.errors import ConfigError


def test_training_reads_the_cache_and_evaluation_runs_the_encoder(synth_root, tmp_path):
    over = tiny_overrides(synth_root, tmp_path / "cache", **{"data.feature_cache": "{views: 2, chunk: 64}",
                                                            "data.train_episodes_per_epoch": 12})  # fmt: skip
    counter = EncoderCalls()
    metrics = run(compose(over), tmp_path / "run", extra_callbacks=[counter])
    assert counter.batches["train"] == 3 and counter.calls["train"] == 0  # 12 episodes, batch 4: no encoder
    assert counter.batches["val"] >= 1 and counter.calls["val"] == counter.batches["val"]
    assert counter.batches["test"] == 3 and counter.calls["test"] == 3  # 12 test episodes, original images
    (folder,) = (tmp_path / "cache" / "features").iterdir()
    done = json.loads((folder / "complete.json").read_text())
    assert done["layout"]["views"] == 2 and done["layout"]["num_images"] == 120
    assert counter.calls["outside"] == 1 + 4 + 4  # layout probe + chunks of 64 and 56 images x 2 views, 32 a batch
    assert 0.0 <= metrics["miou"] <= 1.0

    # a second run with the same key reuses the cache: only the layout probe runs outside batches
    again = EncoderCalls()
    run(compose(over), tmp_path / "run2", extra_callbacks=[again])
    assert again.calls["outside"] == 1 and again.calls["train"] == 0
    assert [p.name for p in (tmp_path / "cache" / "features").iterdir()] == [folder.name]


class ReadsImages(nn.Module):
    needs_images = True


def test_a_part_that_reads_images_is_refused(synth_root, tmp_path):
    from fsseg.cli.common import instantiate

    cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", **{"data.feature_cache": "{views: 1}"}))
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_eval_classes=5)
    model.aux_losses["reader"] = ReadsImages()
    with pytest.raises(ConfigError, match=r"aux_losses.reader.*needs_images.*data.feature_cache=null"):
        datamodule.prepare_feature_cache(model)
    assert not (tmp_path / "cache" / "features").exists()  # refused before any work


@pytest.mark.parametrize("experiment, extra", [("apanet_effl0_synth", {"aux.class_agnostic.n": 3}),
                                               ("celp_effl0_synth", {})])  # fmt: skip
def test_the_bias_studys_stage3_methods_train_from_the_cache(experiment, extra, synth_root, tmp_path):
    """APANet (n = 3) and CELP, as the bias study's stage 3 runs them (profile `bias`, data.feature_cache): their
    training steps read cached taps, never the encoder, and the run finishes."""
    over = tiny_overrides(synth_root, tmp_path / "cache", experiment=experiment, **extra,
                          **{"data.feature_cache": "{views: 2, chunk: 64}", "data.train_episodes_per_epoch": 8})  # fmt: skip
    counter = EncoderCalls()
    metrics = run(compose(over), tmp_path / "run", extra_callbacks=[counter])
    assert counter.batches["train"] == 2 and counter.calls["train"] == 0
    assert counter.calls["test"] == counter.batches["test"] == 3 and 0.0 <= metrics["miou"] <= 1.0
