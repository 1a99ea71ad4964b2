"""End to end on the embedded benchmark: run records, exact resume, DDP (gloo) fit and sharded evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from fsseg_testing import compose, tiny_overrides

from fsseg.cli.train import run
from fsseg.errors import RunError


def _run(synth_root, tmp_path, name, callbacks=None, **extra):
    cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", **extra))
    run_dir = tmp_path / name
    return cfg, run_dir, run(cfg, run_dir, extra_callbacks=callbacks)


def test_fast_dev_run_writes_complete_run_record(synth_root, tmp_path):
    _cfg, run_dir, _metrics = _run(synth_root, tmp_path, "fdr", debug="fdr")
    for name in ("config.yaml", "provenance.json", "metrics.json"):  # fast_dev_run saves no checkpoint
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "metrics.json").read_text())
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert record["manifest_hash"] == prov["manifest"]["hash"] and len(record["manifest_hash"]) == 64
    assert prov["seeds"] == {"seed": 0, "eval_seed": 321}
    assert {"torch", "lightning", "timm"} <= set(prov["versions"])
    assert 0.0 <= record["metrics"]["miou"] <= 1.0 and len(record["metrics"]["class_iou"]) == 5


class StopAfterFirstEpoch(L.Callback):
    """Simulates an interruption at an epoch boundary (the run's config still says 2 epochs)."""

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.should_stop = True


def test_resume_from_last_checkpoint_is_exact(synth_root, tmp_path):
    extra = {"trainer.max_epochs": 2, "test_checkpoint": "last"}
    _, full_dir, full = _run(synth_root, tmp_path, "full", **extra)
    _, part_dir, _ = _run(synth_root, tmp_path, "part", callbacks=[StopAfterFirstEpoch()], **extra)
    first = torch.load(part_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    _, _, resumed = _run(synth_root, tmp_path, "part", resume="auto", **extra)
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(part_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["miou"] == full["miou"] and resumed["fbiou"] == full["fbiou"]


def _cli(*args: str, cwd: Path) -> None:
    import os
    import subprocess
    import sys

    exe = Path(sys.executable).parent
    env = {**os.environ, "FSSEG_CONF": str(Path(__file__).resolve().parents[1] / "conf")}
    proc = subprocess.run([str(exe / args[0]), *args[1:]], cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(synth_root, tmp_path_factory):
    """fsseg-train with 2 CPU processes (gloo), launched as a user would."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "ddp"
    _cli("fsseg-train", *tiny_overrides(synth_root, tmp / "cache", trainer="ddp_sim"), f"hydra.run.dir={run_dir}", cwd=tmp)
    return tmp, run_dir


def test_ddp_fit_two_cpu_processes_completes(ddp_run):
    _, run_dir = ddp_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["metrics"]["episodes"] == 12  # every episode scored exactly once across the two ranks


def test_eval_two_processes_equals_one_process(ddp_run):
    tmp, run_dir = ddp_run
    results = {}
    for trainer in ("cpu", "ddp_sim"):
        out = tmp / f"eval_{trainer}"
        _cli("fsseg-eval", f"run_dir={run_dir}", "checkpoint=last", f"trainer={trainer}",
             "trainer.enable_progress_bar=false", f"hydra.run.dir={out}", cwd=tmp)  # fmt: skip
        results[trainer] = json.loads((out / "metrics.json").read_text())
    one, two = results["cpu"]["metrics"], results["ddp_sim"]["metrics"]
    assert one["episodes"] == two["episodes"] == 12
    assert results["cpu"]["manifest_hash"] == results["ddp_sim"]["manifest_hash"]
    for key in ("miou", "fbiou", "fp_rate", "fn_rate", "class_iou"):
        assert one[key] == two[key], key


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(synth_root, tmp_path):
    cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", **{"trainer.max_epochs": 2}))

    class PoisonSecondEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.decoder.cls[-1].bias.fill_(float("nan"))

    run_dir = tmp_path / "nan"
    with pytest.raises(RunError, match=r"non-finite loss .* at global step 2"):
        run(cfg, run_dir, extra_callbacks=[PoisonSecondEpoch()])
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (run_dir / "metrics.json").exists()
