"""PAHNet end to end at fixture scale: a tiny SSP run is the frozen predictor of SCCAN-Plus+PAHNet and
HDMNet+PAHNet (one training step, validation and test each, with the M_aff loss); a PAHNet method without a
predictor is refused before any work; under DDP (2 CPU processes, gloo, find_unused_parameters=False) a
PAHNet host trains two steps per rank (DDP raises if any parameter got no gradient in the previous step)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsseg_testing import compose
from test_sccan import _stage1_file, run_tiny

from fsseg.cli.common import instantiate
from fsseg.cli.train import run
from fsseg.errors import ConfigError

TINY = [
    "data.train_size=64", "data.eval_size=64", "data.batch_size=2", "data.eval_batch_size=2",
    "data.train_episodes_per_epoch=2", "data.val_episodes=2", "data.eval_episodes=2", "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false", "logger=none", "encoder.weights=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def predictor_tmp(synth_root, tmp_path_factory):
    """A fixture-scale SSP run where conf/predictor/ssp.yaml looks for it (paths.output_dir=<tmp>/outputs)."""
    tmp = tmp_path_factory.mktemp("pahnet")
    cfg = compose(["method=ssp", "recipe=ssp_synth", f"data.source.root={synth_root}", f"paths.cache_dir={tmp / 'cache'}",
                   f"paths.output_dir={tmp / 'outputs'}", *TINY, "+trainer.limit_train_batches=1"])  # fmt: skip
    run(cfg, tmp / "outputs" / "predictors" / "ssp_ssp_synth" / "fold0")
    return tmp


@pytest.mark.parametrize("experiment", ["sccan_plus_pahnet_effl0_synth", "hdmnet_pahnet_effl0_synth"])
def test_pahnet_host_trains_one_step_with_the_frozen_predictor(experiment, synth_root, predictor_tmp):
    tmp = predictor_tmp / experiment
    tmp.mkdir()
    outputs = predictor_tmp / "outputs"
    metrics = run_tiny(experiment, synth_root, tmp, f"paths.output_dir={outputs}")
    assert 0.0 <= metrics["miou"] <= 1.0 and 0.0 <= metrics["fp_rate"] <= 1.0
    state = torch.load(tmp / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(".enhancements.0." in k for k in state) and any(".calibration.proj_q" in k for k in state)
    assert not [k for k in state if k.startswith("predictor.")]
    logged = (tmp / "run").rglob("metrics.csv")
    header = next(iter(logged), None)
    if header is not None:  # the M_aff term is logged when a CSV logger is on (logger=none here)
        assert "aff" in header.read_text()


def test_pahnet_without_a_predictor_is_refused_before_work(tmp_path):
    over = ["experiment=sccan_plus_pahnet_effl0_synth", "predictor=none", "encoder.weights=none"]
    cfg = compose(over)
    cfg = compose([*over, f"base_learner_path={_stage1_file(tmp_path, cfg.encoder)}"])
    with pytest.raises(ConfigError, match=r"needs guidance \['m_pro'\].*predictor is null"):
        instantiate(cfg.model, num_eval_classes=5)


def test_pahnet_trains_under_ddp_without_unused_parameters(synth_root, predictor_tmp):
    """Two CPU processes (trainer=ddp_sim: Lightning's ddp, find_unused_parameters=False), two steps each."""
    tmp = predictor_tmp / "ddp"
    tmp.mkdir()
    cfg = compose(["experiment=sccan_plus_pahnet_effl0_synth", "encoder.weights=none"])
    stage1 = _stage1_file(tmp, cfg.encoder)
    over = [
        "experiment=sccan_plus_pahnet_effl0_synth", f"data.source.root={synth_root}", f"paths.cache_dir={tmp / 'cache'}",
        f"paths.output_dir={predictor_tmp / 'outputs'}", f"base_learner_path={stage1}", *TINY,
        "data.train_episodes_per_epoch=8", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer=ddp_sim", "decoder.num_blocks=2", f"hydra.run.dir={tmp / 'run'}",
    ]  # fmt: skip
    exe = Path(sys.executable).parent / "fsseg-train"
    env = {**os.environ, "FSSEG_CONF": str(Path(__file__).resolve().parents[1] / "conf")}
    proc = subprocess.run([str(exe), *over], cwd=tmp, env=env, capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    assert "find_unused_parameters" not in out


def test_cost_is_counted_without_training(synth_root, predictor_tmp):
    """Table 5's rows: count_cost=true, train=false, test_after_fit=false -> parameters and FLOPs, no step."""
    tmp = predictor_tmp / "cost"
    tmp.mkdir()
    over = ["experiment=hdmnet_pahnet_effl0_synth", "encoder.weights=none"]
    cfg = compose(over)
    stage1 = _stage1_file(tmp, cfg.encoder)
    cfg = compose([*over, f"data.source.root={synth_root}", f"paths.cache_dir={tmp / 'cache'}", *TINY,
                   f"paths.output_dir={predictor_tmp / 'outputs'}", f"base_learner_path={stage1}", "count_cost=true",
                   "train=false", "test_after_fit=false"])  # fmt: skip
    metrics = run(cfg, tmp / "run")
    assert not (tmp / "run" / "checkpoints").exists() or not any((tmp / "run" / "checkpoints").iterdir())
    model = instantiate(cfg.model, num_eval_classes=5)
    from fsseg.models.segmenter import count_parameters

    assert metrics["params_m"] == pytest.approx(count_parameters(model) / 1e6)
    assert metrics["gflops"] > metrics["gflops_modules"] > 0 and metrics["predictor_gflops"] > 0
    assert metrics["cost_size"] == 64


@pytest.mark.parametrize(("host", "transformer_setting"), [("sccan_plus_pahnet", ("AdamW", 6e-5, 0.01)),
                                                             ("hdmnet_pahnet", ("AdamW", 1e-4, 0.01))])  # fmt: skip
def test_pahnet_parts_train_with_the_blocks_optimizer(host, transformer_setting, synth_root, predictor_tmp):
    """The reference builds PFE and ASC inside each attention block, so the optimizer of the transformer trains
    them (SCCAN-Plus: AdamW at a constant 6e-5, weight decay 0.01 -- not the convolutions' optimizer), in every
    recipe of the host."""
    import re

    tmp = predictor_tmp / f"groups-{host}"
    tmp.mkdir()
    over = [f"method={host}", f"recipe={host}_synth", "encoder.weights=none", f"data.source.root={synth_root}",
            f"paths.output_dir={predictor_tmp / 'outputs'}"]  # fmt: skip
    cfg = compose([*over, f"base_learner_path={_stage1_file(tmp, compose(over).encoder)}"])
    model = instantiate(cfg.model, num_eval_classes=5)
    opt = model.configure_optimizers()["optimizer"]
    setting = {id(p): (type(o).__name__, g["lr"], g["weight_decay"])
               for o in getattr(opt, "optimizers", [opt]) for g in o.param_groups for p in g["params"]}  # fmt: skip
    names = [n for n, p in model.named_parameters() if id(p) in setting]
    pahnet = [n for n in names if ".enhancements." in n or ".calibration." in n]
    blocks = [n for n in names if n.startswith("decoder.transformer.") and n not in pahnet]
    assert len(pahnet) > 20 and blocks
    params = dict(model.named_parameters())
    assert all(setting[id(params[n])] == pytest.approx(transformer_setting) for n in blocks + pahnet)
    for recipe in ("pascal", "coco"):  # same module names; each recipe's groups must send them where the blocks go
        patterns = [g["match"] for g in compose([f"method={host}", f"recipe={host}_{recipe}"]).model.param_groups]

        def group(name):
            return next((i for i, p in enumerate(patterns) if re.search(p, name)), None)  # noqa: B023

        assert {group(n) for n in blocks} == {0} and {group(n) for n in pahnet} == {0}, recipe
