"""BAM end to end on the embedded benchmark: stage 1 (task=base) writes the fold's base learner, stage 2 reads it;
a missing or mismatched stage-1 file is refused before any work, naming the file and the command."""

from __future__ import annotations

import json

import pytest
import torch
from fsseg_testing import EncoderCalls, compose
from omegaconf.errors import InterpolationResolutionError

from fsseg.cli.common import instantiate
from fsseg.cli.train import run
from fsseg.errors import ConfigError


def _overrides(synth_root, tmp_path, *extra: str) -> list[str]:
    return [
        "experiment=bam_effl0_synth",
        f"data.source.root={synth_root}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "data.train_size=64", "data.eval_size=64", "data.batch_size=4", "data.eval_batch_size=4",
        "data.train_episodes_per_epoch=8", "data.val_episodes=8", "data.eval_episodes=12",
        "head.reduce_dim=16", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
        "base_task.train_size=64", "base_task.batch_size=4", "base_task.epochs=1",
        "base_task.encoder_weights=none",
        *extra,
    ]  # fmt: skip


def test_stage2_without_stage1_names_the_file_and_the_command(synth_root, tmp_path):
    cfg = compose(_overrides(synth_root, tmp_path))
    # raised while the config resolves (OmegaConf wraps it), before anything is built or read
    with pytest.raises((ConfigError, InterpolationResolutionError), match=r"no stage-1 base learner at .*fold0\.pt.*fsseg-train task=base"):
        instantiate(cfg.model, num_eval_classes=5)


def test_base_learner_then_bam(synth_root, tmp_path, monkeypatch):
    stage1 = ["task=base", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
              "base_task.encoder_frozen=false", "base_task.encoder_bn=train"]  # BAM's form: the backbone fine-tuned
    cfg1 = compose(_overrides(synth_root, tmp_path, *stage1))
    assert cfg1.model._target_.endswith("BaseLearnerModule") and cfg1.encoder.frozen is False
    m1 = run(cfg1, tmp_path / "stage1")
    artifact = tmp_path / "outputs" / "base_learners" / "synth_effl0" / "fold0.pt"
    blob = torch.load(artifact, weights_only=True)
    assert blob["meta"]["fold"] == 0 and blob["meta"]["base_class_ids"] == list(range(6, 21))  # fold 0 novel = 1..5
    assert blob["meta"]["encoder"] == "tf_efficientnet_lite0" and len(m1["class_iou"]) == 15
    trained = blob["meta"]["trained"]  # the budget it was trained with: a smoke run, 3 batches per epoch
    assert trained["limit_train_batches"] == 3 and trained["fast_dev_run"] is False
    assert trained["global_step"] == 3 * trained["epochs"] > 0
    assert 0.0 <= m1["miou"] <= 1.0
    assert json.loads((tmp_path / "stage1" / "metrics.json").read_text())["metrics"]["miou"] == m1["miou"]

    cfg2 = compose(_overrides(synth_root, tmp_path))
    metrics = run(cfg2, tmp_path / "stage2")
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["class_iou"]) == 5
    # BAM's claim, measured on every evaluation: base-class pixels predicted foreground, final and meta outputs
    assert 0.0 <= metrics["base_fp_rate"] <= 1.0 and 0.0 <= metrics["base_fp_rate_meta"] <= 1.0
    # the meta learner alone is scored too (test/*_meta): the same numbers as scoring meta_logits as the output
    from fsseg.cli.evaluate import evaluate
    from fsseg.models.segmenter import FewShotSegmenter

    last = tmp_path / "stage2" / "checkpoints" / "last.ckpt"
    final = evaluate(cfg2, last, compose([], "eval").trainer, tmp_path / "ev_final")
    forward = FewShotSegmenter.forward
    monkeypatch.setattr(FewShotSegmenter, "forward", lambda self, b: {**(o := forward(self, b)), "logits": o["meta_logits"]})
    meta = evaluate(cfg2, last, compose([], "eval").trainer, tmp_path / "ev_meta")
    for key in ("miou", "fbiou", "fp_rate", "fn_rate"):
        assert final[f"{key}_meta"] == pytest.approx(meta[key], abs=1e-6), key
    assert meta["base_fp_rate"] == pytest.approx(final["base_fp_rate_meta"], abs=1e-6)
    ckpt = torch.load(last, weights_only=True)["state_dict"]
    # the frozen base learner and the stage-1 encoder reached stage 2 unchanged
    for key, value in blob["state_dict"].items():
        if key.startswith("head."):
            assert torch.equal(ckpt["ensemble.base_learner.module." + key[len("head."):]], value), key
    enc = {k: v for k, v in blob["state_dict"].items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(ckpt[k], v) for k, v in enc.items())  # fine-tuned weights and BN statistics
    means = [v for k, v in enc.items() if k.endswith("running_mean")]
    assert means and all(v.abs().sum() > 0 for v in means)  # BN in training mode moved them from their zero init

    # the same file for another fold is refused, naming what differs
    cfg3 = compose(_overrides(synth_root, tmp_path, f"base_learner_path={artifact}", "data.fold=1"))
    with pytest.raises(ConfigError, match=r"fold: file has 0, expected 1"):
        instantiate(cfg3.model, num_eval_classes=5)


def test_prerequisites_auto_trains_the_missing_stage1_first(synth_root, tmp_path):
    """fsseg-train as a sweep or multirun job launches it: stage 1 runs first, then stage 2 reads its file."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    over = _overrides(synth_root, tmp_path, "prerequisites=auto", "+trainer.limit_train_batches=2",
                      "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=2",
                      f"hydra.run.dir={tmp_path / 'stage2'}")  # fmt: skip
    env = {**os.environ, "FSSEG_CONF": str(Path(__file__).resolve().parents[1] / "conf")}
    exe = Path(sys.executable).parent / "fsseg-train"
    proc = subprocess.run([str(exe), *over], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    artifact = tmp_path / "outputs" / "base_learners" / "synth_effl0" / "fold0.pt"
    assert artifact.is_file() and (artifact.parent / "runs" / "fold0" / "metrics.json").is_file()
    assert (tmp_path / "stage2" / "metrics.json").is_file()


def test_bam_on_cached_features_as_the_bias_study_runs_it(synth_root, tmp_path):
    """The bias study's stage 3 runs BAM with data.feature_cache and one stage-1 file per dataset: stage 1 (frozen
    encoder, bam_synth) trains on images, stage 2 reads cached taps in training and the run finishes."""
    over = _overrides(synth_root, tmp_path, "data.feature_cache={views: 2, chunk: 64}", "encoder.weights=none",
                      "base_learner_path=${paths.output_dir}/base_learners/bias/${data.source.root}/fold${data.fold}.pt")  # fmt: skip
    run(compose([*over, "task=base"]), tmp_path / "stage1")
    assert (tmp_path / "outputs" / "base_learners" / "bias").is_dir()
    counter = EncoderCalls()
    metrics = run(compose(over), tmp_path / "stage2", extra_callbacks=[counter])
    assert counter.batches["train"] == 2 and counter.calls["train"] == 0
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["miou_meta"] <= 1.0
