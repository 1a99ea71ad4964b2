"""I2R end to end on the embedded benchmark: BAM's stage 1 (encoder frozen) writes the fold's base learner, I2R
trains on it with CAMs from the encoder's ImageNet head; evaluation takes gradients (inference mode off), reports
Table 4's prior cross entropy and Table 5's mask ratios, and works again under fsseg-eval."""

from __future__ import annotations

import pytest
import torch
from fsseg_testing import compose

from fsseg.cli.common import instantiate
from fsseg.cli.evaluate import evaluate
from fsseg.cli.train import run
from fsseg.errors import ConfigError


def _overrides(synth_root, tmp_path, *extra: str) -> list[str]:
    return [
        f"data.source.root={synth_root}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "data.train_size=64", "data.eval_size=64", "data.batch_size=4", "data.eval_batch_size=4",
        "data.train_episodes_per_epoch=8", "data.val_episodes=8", "data.eval_episodes=12",
        "head.reduce_dim=16", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
        "base_task.train_size=64", "base_task.batch_size=4", "base_task.epochs=1",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("i2r")
    cfg = compose(["experiment=bam_effl0_synth", *_overrides(synth_root, tmp, "task=base", "+trainer.limit_train_batches=3",
                                                            "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2")])
    run(cfg, tmp / "stage1")
    return tmp


@pytest.fixture(scope="module")
def i2r_run(synth_root, stage1):
    cfg = compose(["experiment=i2r_effl0_synth", *_overrides(synth_root, stage1, "decoder.num_decoders=2",
                                                             "decoder.num_cross_blocks=2")])
    return cfg, run(cfg, stage1 / "i2r")


def test_i2r_trains_and_evaluates_with_cams(i2r_run, stage1, tmp_path):
    cfg, metrics = i2r_run
    # the embedded recipe's CAMs come from the stage-1 domain classifier (no ImageNet head kept)
    assert cfg.trainer.inference_mode is False and cfg.encoder.keep_head is False and cfg.head.classifier is not None
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["class_iou"]) == 5
    assert metrics["prior_ce"] > 0  # Table 4
    assert {"mask_ratio_cab0", "mask_ratio_cab1"} <= set(metrics)  # Table 5, measured with the query mask
    assert all(0.0 <= metrics[f"mask_ratio_cab{i}"] < 1.0 for i in range(2))
    # fsseg-eval evaluates the checkpoint again (its trainer takes the run's inference_mode=false): same numbers
    again = evaluate(cfg, stage1 / "i2r" / "checkpoints" / "last.ckpt", compose(["experiment=i2r_effl0_synth"]).trainer,
                     tmp_path / "eval")
    assert again["miou"] == pytest.approx(metrics["miou"], abs=1e-6)
    assert again["prior_ce"] == pytest.approx(metrics["prior_ce"], rel=1e-5)


def test_i2r_evaluation_under_ddp_equals_one_process(i2r_run, stage1, tmp_path):
    """fsseg-eval with two CPU processes (gloo): the CAMs take gradients in each rank; same scores."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent
    env = {**os.environ, "FSSEG_CONF": str(Path(__file__).resolve().parents[1] / "conf")}
    results = {}
    for trainer in ("cpu", "ddp_sim"):
        out = tmp_path / trainer
        proc = subprocess.run(
            [str(exe / "fsseg-eval"), f"run_dir={stage1 / 'i2r'}", "checkpoint=last", f"trainer={trainer}",
             "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[trainer] = json.loads((out / "metrics.json").read_text())["metrics"]
    one, two = results["cpu"], results["ddp_sim"]
    assert one["episodes"] == two["episodes"] == 12
    for key in ("miou", "fbiou", "class_iou"):
        assert one[key] == pytest.approx(two[key], abs=1e-6), key
    assert one["prior_ce"] == pytest.approx(two["prior_ce"], rel=1e-5)


def test_cams_under_inference_mode_are_a_config_error(synth_root, stage1, tmp_path):
    cfg = compose(["experiment=i2r_effl0_synth", *_overrides(synth_root, stage1, "decoder.num_decoders=1",
                                                             "decoder.num_cross_blocks=1", "trainer.inference_mode=true")])
    with pytest.raises(ConfigError, match="inference_mode=false"):
        run(cfg, tmp_path / "run")


def test_ablation_rows_compose_and_step(synth_root, stage1):
    """Table 3's rows: PMGM off (BAM's prior, each support's own prior for the branch), no support branch,
    CyCTR's masking; one training step each, the frozen parts untouched by the optimiser."""
    rows = [
        ["head.pmgm=false", "decoder.support_branch=false", "decoder.attention_mask=none"],
        ["head.pmgm=false", "decoder.support_branch=true", "decoder.attention_mask=dicm"],
        ["head.pmgm=true", "decoder.support_branch=true", "decoder.attention_mask=cyctr", "cam_classifier=imagenet"],
        ["head.pmgm=true", "decoder.attention_mask=dicm", "decoder.eval_attention_mask=column", "head.cam_threshold=adaptive",
         "head.cam_method=gradcampp"],
    ]
    from fsseg.data import batch as B

    for row in rows:
        cfg = compose(["experiment=i2r_effl0_synth", *_overrides(synth_root, stage1, "decoder.num_decoders=2",
                                                                 "decoder.num_cross_blocks=1", *row)])
        dm = instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        model = instantiate(cfg.model, num_eval_classes=5)
        batch = next(iter(dm.train_dataloader()))
        model.train()
        loss = model.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss), row
        assert all(p.grad is None for p in model.encoder.parameters())
        assert all(p.grad is None for p in model.ensemble.base_learner.parameters())
        model.eval()
        with torch.no_grad():
            out = model(batch)
        assert out["logits"].shape[:2] == (batch[B.QUERY_IMG].shape[0], 2), row


def test_support_losses_are_training_only(synth_root, stage1, monkeypatch):
    """Validation and test run no auxiliary loss: the support-branch terms never see evaluation batches."""
    from fsseg.models.losses import SupportCE

    def refuse(*args, **kwargs):
        raise AssertionError("a support loss ran at evaluation")

    cfg = compose(["experiment=i2r_effl0_synth", *_overrides(synth_root, stage1, "decoder.num_decoders=2",
                                                             "decoder.num_cross_blocks=1")])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(cfg.model, num_eval_classes=5).eval()
    monkeypatch.setattr(SupportCE, "forward", refuse)
    batch = next(iter(dm.val_dataloader()))
    model.validation_step(batch, 0)
    assert model.val_iou.compute()["episodes"] > 0
