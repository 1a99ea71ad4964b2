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
