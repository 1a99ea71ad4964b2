"""PAHNet's predictors end to end at fixture scale: `fsseg-train method=ssp` trains a run; a host (PFENet, which
ignores m_pro) loads it frozen as `predictor=ssp` from the path its config names; the loader refuses runs made for
another fold, encoder or dataset; prerequisites=auto trains a missing predictor run with its own method/recipe."""

from __future__ import annotations

import pytest
import torch
from fsseg_testing import compose

from fsseg.cli.common import instantiate
from fsseg.cli.train import run
from fsseg.data import batch as B
from fsseg.errors import ConfigError
from fsseg.models.predictors import load_predictor
from fsseg.prerequisites import ensure_prerequisites, predictor_overrides

TINY = [
    "data.train_size=64", "data.eval_size=64", "data.batch_size=4", "data.eval_batch_size=4",
    "data.train_episodes_per_epoch=8", "data.val_episodes=8", "data.eval_episodes=8", "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false", "logger=none", "encoder.weights=none",
]  # fmt: skip


def _paths(synth_root, tmp):
    return [f"data.source.root={synth_root}", f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'outputs'}"]


@pytest.fixture(scope="module")
def ssp_run(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    cfg = compose(["method=ssp", "recipe=ssp_synth", *_paths(synth_root, tmp), *TINY])
    run_dir = tmp / "outputs" / "predictors" / "ssp_ssp_synth" / "fold0"  # where conf/predictor/ssp.yaml looks
    metrics = run(cfg, run_dir)
    return tmp, run_dir, metrics


def test_ssp_trains_and_a_host_reads_it_frozen(ssp_run, synth_root):
    tmp, run_dir, metrics = ssp_run
    assert 0.0 <= metrics["miou"] <= 1.0 and (run_dir / "checkpoints" / "best.ckpt").is_file()
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    host_cfg = compose(["experiment=pfenet_effl0_synth", "predictor=ssp", "head.reduce_dim=16", *_paths(synth_root, tmp), *TINY])
    data = instantiate(host_cfg.data)
    data.prepare_data()
    data.setup("fit")
    host = instantiate(host_cfg.model, **data.model_args())
    pred = host.predictor
    # the SSP run's own fine-tuned encoder (trained blocks differ from the host's frozen encoder), loaded exactly
    key = next(k for k in state if k.startswith("encoder.model.blocks.3.") and k.endswith("weight"))
    torch.testing.assert_close(pred.model.state_dict()[key], state[key])
    assert not torch.equal(host.state_dict()[key], state[key])
    assert not any(p.requires_grad for p in pred.parameters())
    batch = next(iter(data.train_dataloader()))
    host.train()
    out = host(batch)
    with torch.no_grad():
        expected = pred.model(batch)["logits"].softmax(1)[:, 1:2]
    assert out["m_pro"].shape == (4, 1, 8, 8)  # 64 px at stride 8
    torch.testing.assert_close(out["m_pro"], expected)
    assert not pred.training and not pred.model.encoder.training
    # the host trains with it (one fixture-scale run); its checkpoint holds no predictor tensor
    host_metrics = run(host_cfg, tmp / "host")
    assert 0.0 <= host_metrics["miou"] <= 1.0
    host_state = torch.load(tmp / "host" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert host_state and not [k for k in host_state if k.startswith("predictor.")]
    # fsseg-eval rebuilds the host from its config: the predictor is reloaded from its run, same scores
    from fsseg.cli.evaluate import evaluate

    ckpt = tmp / "host" / "checkpoints" / "best.ckpt"
    again = evaluate(host_cfg, ckpt, compose(["experiment=pfenet_effl0_synth", *TINY]).trainer, tmp / "host_eval")
    assert again["miou"] == pytest.approx(host_metrics["miou"], abs=1e-6)


def test_loader_refuses_another_fold_encoder_or_dataset(ssp_run, synth_root):
    tmp, run_dir, _ = ssp_run
    ok = {"run": run_dir, "fold": 0, "encoder": "tf_efficientnet_lite0", "dataset": str(synth_root), "method": "ssp"}
    assert load_predictor(**ok) is not None
    for change, named in (({"fold": 1}, r"data\.fold: predictor run has 0, this run has 1"),
                          ({"encoder": "resnet50s"}, r"encoder\.name: predictor run has 'tf_efficientnet_lite0', this run has 'resnet50s'"),
                          ({"dataset": "/data/VOC2012"}, r"dataset: predictor run has 'synth', this run has 'VOC2012'")):  # fmt: skip
        with pytest.raises(ConfigError, match=named):
            load_predictor(**{**ok, **change})
    with pytest.raises(ConfigError, match=r"no trained run at .*fsseg-train method=ssp recipe=ssp_synth data\.fold=2"):
        load_predictor(**{**ok, "run": tmp / "nowhere", "fold": 2, "recipe": "ssp_synth"})
    # through the host's config: fold 1 reads the fold-1 path, which has no run yet
    cfg = compose(["experiment=pfenet_effl0_synth", "predictor=ssp", "data.fold=1", *_paths(synth_root, tmp), *TINY])
    with pytest.raises(ConfigError, match=r"predictor 'ssp': no trained run at .*fold1"):
        instantiate(cfg.model, num_eval_classes=5)


def test_prerequisites_auto_trains_a_missing_predictor_once(tmp_path):
    pred = {"run": str(tmp_path / "predictors" / "ssp_ssp_synth" / "fold2"), "method": "ssp", "recipe": "ssp_synth"}
    calls = []

    def runner(overrides):
        calls.append(overrides)
        run = tmp_path / "predictors" / "ssp_ssp_synth" / "fold2"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        (run / "checkpoints" / "best.ckpt").write_bytes(b"x")
        (run / "metrics.json").write_text("{}")

    host = ["experiment=sccan_plus_effl0_synth", "data.fold=2", "encoder=efficientnet_lite0", "head.reduce_dim=64", "seed=3"]
    trained = ensure_prerequisites(host, {"predictor": pred}, runner)
    assert trained == [tmp_path / "predictors" / "ssp_ssp_synth" / "fold2"]
    assert calls == [["method=ssp", "recipe=ssp_synth", "data.fold=2", "encoder=efficientnet_lite0",
                      f"hydra.run.dir={pred['run']}", "prerequisites=auto", "resume=auto",
                      "trainer.enable_progress_bar=false"]]  # fmt: skip
    assert ensure_prerequisites(host, {"predictor": pred}, runner) == [] and len(calls) == 1  # present: not again
    assert predictor_overrides(["method=x", "recipe=y", "predictor=ssp"], {**pred, "recipe": None}) == [
        "method=ssp", f"hydra.run.dir={pred['run']}", "prerequisites=auto", "resume=auto",
        "trainer.enable_progress_bar=false"]  # fmt: skip


def test_an_interrupted_predictor_run_is_resumed_not_read(ssp_run, synth_root, tmp_path):
    """A predictor run killed part way holds config.yaml and a best.ckpt of its first epochs but no metrics.json:
    prerequisites=auto trains it again (resume=auto continues from its last.ckpt) and the loader refuses it."""
    import shutil

    _, finished, _ = ssp_run
    run_dir = tmp_path / "fold0"
    shutil.copytree(finished, run_dir)
    (run_dir / "metrics.json").unlink()
    with pytest.raises(ConfigError, match=r"has not finished .*metrics\.json missing.*resume=auto"):
        load_predictor(run_dir, 0, "tf_efficientnet_lite0", str(synth_root), "ssp", recipe="ssp_synth")
    assert load_predictor(run_dir, 0, "tf_efficientnet_lite0", str(synth_root), "ssp", checkpoint=str(
        run_dir / "checkpoints" / "best.ckpt")) is not None  # an explicit checkpoint file is the user's choice  # fmt: skip
    calls = []

    def runner(overrides):
        calls.append(overrides)
        (run_dir / "metrics.json").write_text("{}")

    pred = {"run": str(run_dir), "method": "ssp", "recipe": "ssp_synth"}
    assert ensure_prerequisites(["data.fold=0"], {"predictor": pred}, runner) == [run_dir]
    assert len(calls) == 1 and "resume=auto" in calls[0]


@pytest.mark.parametrize(("method", "extra"), [("hpa", ["head.bank_max_images=24", "head.reduce_dim=16"]),
                                               ("rare", ["head.reduce_dim=16"])])  # fmt: skip
def test_hpa_and_rare_train_and_load_as_predictors(method, extra, synth_root, tmp_path):
    cfg = compose([f"method={method}", f"recipe={method}_synth", *_paths(synth_root, tmp_path), *TINY, *extra])
    run_dir = tmp_path / "outputs" / "predictors" / f"{method}_{method}_synth" / "fold0"
    metrics = run(cfg, run_dir)
    assert 0.0 <= metrics["miou"] <= 1.0
    pred = load_predictor(run_dir, 0, "tf_efficientnet_lite0", str(synth_root), method)
    batch = {B.QUERY_IMG: torch.randn(2, 3, 64, 64), B.SUPPORT_IMGS: torch.randn(2, 1, 3, 64, 64),
             B.SUPPORT_MASKS: (torch.rand(2, 1, 64, 64) > 0.5).long(), B.CLASS_IDX: torch.zeros(2, dtype=torch.long)}  # fmt: skip
    m_pro = pred(batch)
    assert m_pro.shape == (2, 1, 8, 8) and bool(((m_pro >= 0) & (m_pro <= 1)).all())
    if method == "hpa":  # the bank came with the weights: loaded, not recomputed (no source access needed)
        state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        assert bool(pred.model.head.bank_ready) and state["head.bank"].abs().sum() > 0
        torch.testing.assert_close(pred.model.head.bank, state["head.bank"])
