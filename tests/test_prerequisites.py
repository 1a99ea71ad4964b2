"""A stage-2 run's missing stage-1 file is trained first with the run's own overrides (minus run-only keys)
plus task=base; an existing file is never retrained."""

from __future__ import annotations

from fsseg.prerequisites import ensure_prerequisites, stage1_overrides


def test_missing_stage1_is_trained_once_with_the_runs_recipe(tmp_path):
    artifact = tmp_path / "base_learners" / "synth_effl0" / "fold2.pt"
    cfg = {"task_name": "train", "base_learner_path": str(artifact)}
    overrides = ["experiment=bam_effl0_synth", "data.fold=2", "seed=1", "hydra.run.dir=/x/run", "+sweep_name=t", "resume=auto"]
    calls = []

    def runner(over):
        calls.append(over)
        artifact.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_bytes(b"stage1")

    assert ensure_prerequisites(overrides, cfg, runner) == [artifact]
    assert calls == [["experiment=bam_effl0_synth", "data.fold=2", "task=base",
                      f"hydra.run.dir={artifact.parent / 'runs' / 'fold2'}", "trainer.enable_progress_bar=false"]]  # fmt: skip
    assert ensure_prerequisites(overrides, cfg, runner) == [] and len(calls) == 1  # the file exists: reused
    assert ensure_prerequisites(overrides, {"task_name": "base", "base_learner_path": str(tmp_path / "x.pt")}, runner) == []
    assert ensure_prerequisites(overrides, {"task_name": "train"}, runner) == []  # PFENet: nothing needed


def test_stage1_overrides_drop_run_only_keys():
    assert stage1_overrides(["data.fold=0", "seed=3", "logger=none", "tags=[a]"], "/r") == [
        "data.fold=0", "task=base", "hydra.run.dir=/r", "trainer.enable_progress_bar=false"]  # fmt: skip


def test_a_stage1_file_from_a_smoke_run_is_trained_again_for_a_full_run(tmp_path, capsys):
    """A file whose meta records a smoke budget (limit_train_batches / fast_dev_run) serves smoke runs only: a run
    without limits trains stage 1 over it; files without the record (converted, older) are reused as before."""
    import torch

    from fsseg.models.base_learner import write_artifact

    artifact = tmp_path / "base_learners" / "synth_effl0" / "fold0.pt"
    smoke = {"global_step": 3, "epochs": 1, "limit_train_batches": 3, "fast_dev_run": False}
    full = {"global_step": 500, "epochs": 2, "limit_train_batches": 1.0, "fast_dev_run": False}
    calls = []

    def runner(over):
        calls.append(over)
        write_artifact(artifact, {"head.w": torch.zeros(1)}, {"fold": 0, "trained": full})

    write_artifact(artifact, {"head.w": torch.zeros(1)}, {"fold": 0, "trained": smoke})
    limited = {"task_name": "train", "base_learner_path": str(artifact), "trainer": {"limit_train_batches": 2}}
    assert ensure_prerequisites(["data.fold=0"], limited, runner) == [] and not calls  # a smoke run may read it
    plain = {"task_name": "train", "base_learner_path": str(artifact), "trainer": {"max_epochs": 2}}
    assert ensure_prerequisites(["data.fold=0"], plain, runner) == [artifact] and len(calls) == 1
    assert "written by a smoke run (global_step=3, epochs=1, limit_train_batches=3" in capsys.readouterr().out
    assert ensure_prerequisites(["data.fold=0"], plain, runner) == [] and len(calls) == 1  # now a full file: reused
    write_artifact(artifact, {"head.w": torch.zeros(1)}, {"fold": 0})  # no record (converted): reused
    assert ensure_prerequisites(["data.fold=0"], plain, runner) == [] and len(calls) == 1
    write_artifact(artifact, {"head.w": torch.zeros(1)}, {"fold": 0, "trained": {**full, "fast_dev_run": True}})
    assert ensure_prerequisites(["data.fold=0"], plain, runner) == [artifact] and len(calls) == 2


def test_limited_training_reads_lightnings_two_forms():
    from fsseg.runs import limited_training

    assert limited_training(3) and limited_training(1) and limited_training(0.25)  # a count, or a fraction < 1
    assert not limited_training(1.0) and not limited_training(None) and not limited_training(True)
    assert not limited_training("${x}")  # an unresolved value is not a smoke budget (and never raises)
    assert limited_training(None, fast_dev_run=True) and limited_training(1.0, fast_dev_run=5)
