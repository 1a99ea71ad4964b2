"""Sweep files (sweeps/<paper>/<table>.yaml) and fsseg-sweep: every file parses and composes; runs expand into
deterministic directories; finished runs are skipped (resume), stale ones re-run; a failing run is recorded and
the rest go on; the multirun (submitit) path runs a two-job sweep and its SLURM config composes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fsseg_testing import CONF, REPO, compose, tiny_overrides
from hydra.utils import instantiate as hydra_instantiate

from fsseg.errors import ConfigError
from fsseg.sweeps import (
    compose_run_configs,
    find_sweep,
    format_value,
    list_sweeps,
    load_sweep,
    merge_overrides,
    missing_methods,
    slugify,
    sweep_name_of,
)

SWEEPS = REPO / "sweeps"
ALL = list_sweeps(SWEEPS)


# --------------------------------------------------------------------------- every sweep file
def test_there_are_sweep_files():
    assert SWEEPS / "apanet" / "table4.yaml" in ALL


@pytest.mark.parametrize("path", ALL, ids=[sweep_name_of(p, SWEEPS) for p in ALL])
def test_sweep_file_parses_and_composes(path):
    """Paper numbers are numbers or null under labels of `columns` (load_sweep checks); the name matches the make
    target; tables with every method implemented compose each row (paper protocol and profiles); the others fail
    at once naming the missing methods."""
    sweep = load_sweep(path)
    assert sweep.name == sweep_name_of(path, SWEEPS), f"{path}: name must be {sweep_name_of(path, SWEEPS)}"
    labels = set(sweep.column_labels) | {"Mean", "value"}
    for row in sweep.rows:
        for values in row.paper.values():
            assert set(values) <= labels, (row.label, set(values) - labels)
            assert all(v is None or isinstance(v, float) for v in values.values())
    missing = missing_methods(sweep, CONF)
    if missing:
        from fsseg.cli.sweep import run_sweep

        with pytest.raises(ConfigError, match="not implemented yet: " + ", ".join(missing)):
            run_sweep(sweep, dry_run=True, render=False)
        return
    firsts = {}  # the first run of every row under every profile: each row's overrides compose
    for profile in [None, *sweep.profile_names()]:
        runs = sweep.expand(profile, "/tmp/fsseg-sweep-compose")
        assert runs, f"{sweep.name} [{profile}] has no runs"
        for run in runs:
            firsts.setdefault((profile, run.row.label), run)
    configs = compose_run_configs([([*r.overrides, "resume=auto"], r.run_dir) for r in firsts.values()], CONF)
    for (profile, label), run, cfg in zip(firsts, firsts.values(), configs):
        assert not isinstance(cfg, Exception), f"{sweep.name} [{profile or 'paper'}] row {label!r}: {cfg}"
        assert cfg["sweep_name"] == sweep.name
        for part in ("decoder", "main_loss", "aux_losses"):  # the parts a row swaps instantiate (e.g. no FEM key on CyCTR)
            try:
                hydra_instantiate(cfg["model"][part])
            except Exception as exc:  # noqa: BLE001 - report which row breaks
                pytest.fail(f"{sweep.name} [{profile or 'paper'}] row {label!r}: model.{part}: {exc}")
        for key, value in run.point.items():  # grid values reach the config (config-group keys aside)
            node = cfg
            for part in key.split("."):
                node = node.get(part, "<group>") if isinstance(node, dict) else "<group>"
            assert node in (value, "<group>"), (key, node, value)


# --------------------------------------------------------------------------- parsing and expansion
def test_apanet_table4_expansion():
    sweep = load_sweep(find_sweep("apanet-table4", SWEEPS))
    paper = sweep.expand(None, "out")
    assert len(paper) == 24 and {r.point["data.fold"] for r in paper} == {0, 1, 2, 3}
    emb = sweep.expand("embedded", "out")
    assert [r.run_dir.as_posix() for r in emb[:2]] == [
        "out/apanet-table4/embedded/n-0-baseline/data.fold-0_seed-0",
        "out/apanet-table4/embedded/n-1/data.fold-0_seed-0",
    ]
    assert "apanet_lambda=0" in emb[0].overrides and "aux.class_agnostic.n=0" in emb[0].overrides
    assert emb[0].overrides[:2] == ("method=apanet", "recipe=synth")  # the profile's base replaces the paper's
    assert "encoder=resnet50" in paper[0].overrides and "encoder=resnet50" not in emb[0].overrides
    assert emb[0].row.paper[None] == {"Fold-0": 61.7, "Fold-1": 69.5, "Fold-2": 55.4, "Fold-3": 56.3, "Mean": 60.8}
    assert [c.label for c in sweep.columns("embedded")] == ["Fold-0"] and not sweep.all_columns_run("embedded")


def test_merge_overrides_later_wins_in_place():
    assert merge_overrides(["experiment=a", "x=1", "+y=2"], ["x=3", "~y", "z=4"]) == ["experiment=a", "x=3", "z=4"]
    assert merge_overrides(["a.b=1"], ["~a.b"]) == ["~a.b"]


def test_slug_and_format():
    assert slugify("n = 0 (baseline)") == "n-0-baseline"
    assert slugify("1-shot / Fold-0") == "1-shot-Fold-0"
    assert format_value("a b") == "'a b'" and format_value([1, 2]) == "[1,2]" and format_value(0.5) == "0.5"
    assert format_value("true") == "'true'" and format_value(None) == "null"


def _write(tmp_path, doc: dict, name: str = "demo/table1.yaml") -> Path:
    path = tmp_path / "sweeps" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _doc(**changes) -> dict:
    doc = {
        "name": "demo-table1", "paper": "demo", "title": "t", "methods": ["pfenet"], "base": ["experiment=pfenet_effl0_synth"],
        "grid": {"data.fold": [0, 1], "seed": [0]},
        "columns": {"by": "data.fold", "labels": ["Fold-0", "Fold-1"], "mean": True},
        "rows": [{"label": "a", "overrides": [], "paper": {"Fold-0": 1.0, "Fold-1": None, "Mean": 2}}],
    }  # fmt: skip
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grids": {}}, r"unknown key\(s\) \['grids'\]"),
        ({"rows": [{"label": "a", "paper": {"Fold-9": 1.0}}]}, r"rows\[0\]\.paper: column 'Fold-9' is not one of"),
        ({"rows": [{"label": "a", "paper": {"Fold-0": "61.7"}}]}, r"'61.7' is not a number or null"),
        ({"rows": [{"label": "a", "overrides": ["data.shots=1,5"]}]}, r"sweeps several values; put the values in `grid:`"),
        ({"rows": [{"label": "a", "overrides": ["hydra.run.dir=x"]}]}, r"sets Hydra's own config"),
        ({"grid": {"data.fold": [0, 1], "data.shots": [1, 5]}}, r"grid.data.shots has several values"),
        ({"columns": {"by": "data.fold", "labels": ["Fold-0"]}}, r"1 labels but grid.data.fold has 2 values"),
        ({"name": "Demo Table"}, r"must be a plain slug"),
        ({"profiles": {"tiny": {"grid": {"data.fold": [7]}}}}, r"\[7\] are not columns of the table"),
        ({"profiles": {"tiny": {"rows": [{"label": "zz", "overrides": []}]}}}, r"no row labelled 'zz'"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, changes, message):
    path = _write(tmp_path, _doc(**changes))
    with pytest.raises(ConfigError, match=message) as info:
        load_sweep(path)
    assert str(path) in str(info.value)


def test_profile_rows_and_shared_runs(tmp_path):
    doc = _doc(rows=[{"label": "miou", "overrides": ["seed=0"]}, {"label": "fbiou", "overrides": ["seed=0"]}],
               grid={"data.fold": [0, 1]},
               profiles={"tiny": {"base": ["experiment=pfenet_effl0_synth"], "grid": {"data.fold": [0]},
                                  "rows": [{"label": "fbiou", "overrides": ["head.reduce_dim=32"]}]}})  # fmt: skip
    sweep = load_sweep(_write(tmp_path, doc))
    runs = sweep.expand(None, tmp_path / "out")
    assert [r.shared for r in runs] == [False, False, True, True]  # same overrides: one run serves both rows
    assert runs[2].run_dir == runs[0].run_dir
    tiny = sweep.expand("tiny", tmp_path / "out")
    assert [r.row.label for r in tiny] == ["fbiou"] and "head.reduce_dim=32" in tiny[0].overrides


def test_missing_method_fails_at_once_naming_it(tmp_path, capsys):
    from fsseg.cli.sweep import main

    path = _write(tmp_path, _doc(methods=["pfenet", "nosuchnet", "othernet"]))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nosuchnet, othernet" in err and "conf/method/nosuchnet.yaml" in err
    assert not (tmp_path / "out").exists()


def test_list_tables(capsys):
    from fsseg.cli.sweep import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "reproduce-apanet-table4" in out and "embedded" in out


# --------------------------------------------------------------------------- running (subprocesses)
def _tiny_sweep(tmp_path, synth_root, rows, seeds=(0,), by_fold=True) -> Path:
    base = tiny_overrides(synth_root, tmp_path / "cache")
    doc = {
        "name": "demo-table1", "paper": "demo", "title": "tiny", "metric": "miou", "methods": ["pfenet"], "base": base,
        "grid": {"data.fold": [0], "seed": list(seeds)} if by_fold else {"seed": list(seeds)},
        "columns": {"by": "data.fold", "labels": ["Fold-0"], "mean": False} if by_fold else {"labels": ["Fold-0"]},
        "rows": rows, "plot": {"x": "head.reduce_dim", "label": "reduce dim"},
    }  # fmt: skip
    return _write(tmp_path, doc)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FSSEG_CONF", str(CONF))
    return tmp_path


def test_sweep_resumes_skips_and_records_failures(synth_root, in_tmp):
    from fsseg.cli.sweep import main, run_sweep

    tmp_path = in_tmp
    rows = [
        {"label": "dim 32", "overrides": ["head.reduce_dim=32"], "paper": {"Fold-0": 50.0}},
        {"label": "bad fold", "overrides": ["head.reduce_dim=16", "data.fold=7"], "paper": {"Fold-0": 40.0}},
    ]
    path = _tiny_sweep(tmp_path, synth_root, rows, by_fold=False)  # fold 0 (the default); the bad row asks for 7
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out)]) == 1  # one run failed
    root = out / "demo-table1" / "paper"
    good, bad = root / "dim-32" / "seed-0", root / "bad-fold" / "seed-0"
    assert (good / "metrics.json").is_file() and (good / "sweep.json").is_file() and (good / "train.log").is_file()
    assert not (bad / "metrics.json").exists() and "fold" in (bad / "FAILED").read_text()
    md = (root / "table.md").read_text()
    assert "| bad fold | FAILED | 40.0 | — |" in md and "Failed runs:" in md and (root / "table.png").is_file()
    record = json.loads((good / "metrics.json").read_text())
    assert record["manifest_hash"][:16] in md and f"({record['episodes']} episodes)" in md

    sweep = load_sweep(path)
    plan = run_sweep(sweep, out=out, dry_run=True, render=False)  # finished: skipped; failed: retried
    assert [p.status for p in plan.planned] == ["skipped", "pending"]

    cfg_path = good / "config.yaml"  # a changed config makes the finished run stale: re-run (dry run: nothing moves)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["head"]["reduce_dim"] = 64
    cfg_path.write_text(yaml.safe_dump(cfg))
    plan = run_sweep(sweep, out=out, dry_run=True, render=False)
    assert plan.planned[0].status == "pending" and "head.reduce_dim: 64 -> 32" in plan.planned[0].message
    assert (good / "metrics.json").is_file()

    # an interrupted run (no metrics.json) is the only one re-run; the stale one is set aside, not deleted
    outcome = run_sweep(sweep, out=out, render=True)
    assert [p.status for p in outcome.planned] == ["done", "failed"]
    assert list((root / "_stale" / "dim-32").glob("seed-0.*/metrics.json"))
    assert yaml.safe_load(cfg_path.read_text())["head"]["reduce_dim"] == 32
    plan = run_sweep(sweep, out=out, dry_run=True, render=False)
    assert [p.status for p in plan.planned] == ["skipped", "pending"] and "failed earlier" in plan.planned[1].message


def test_multirun_submitit_local_two_jobs(synth_root, in_tmp):
    """The cluster path, locally: one `fsseg-train -m` per row through hydra-submitit-launcher's local executor,
    two jobs (seeds 0 and 1) into the same run directories the local launcher uses."""
    from fsseg.cli.sweep import MultirunLauncher, plan, run_sweep

    tmp_path = in_tmp
    path = _tiny_sweep(tmp_path, synth_root, [{"label": "dim 32", "overrides": ["head.reduce_dim=32"]}], seeds=(0, 1))
    sweep = load_sweep(path)
    out = tmp_path / "out"
    cmds = MultirunLauncher("submitit_local").commands(plan(sweep, None, out, [], str(CONF), apply=False))
    assert len(cmds) == 1 and len(cmds[0][0]) == 2
    cmd = cmds[0][1]
    assert "-m" in cmd and "seed=0,1" in cmd and "hydra/launcher=submitit_local" in cmd
    assert "hydra.sweep.subdir=data.fold-${data.fold}_seed-${seed}" in cmd
    outcome = run_sweep(sweep, out=out, launcher="submitit_local")
    assert [p.status for p in outcome.planned] == ["done", "done"], [p.message for p in outcome.planned]
    root = out / "demo-table1" / "paper" / "dim-32"
    for seed in (0, 1):
        run_dir = root / f"data.fold-0_seed-{seed}"
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["seed"] == seed and cfg["run_dir"] == str(run_dir.resolve()) and cfg["resume"] == "auto"
    assert list(root.glob(".submitit/*"))
    md = (out / "demo-table1" / "paper" / "table.md").read_text()
    assert "| dim 32 |" in md and " ± " in md  # two seeds: a confidence interval
    # the same directories and configs as the local launcher: nothing left to run locally
    assert [p.status for p in run_sweep(sweep, out=out, dry_run=True, render=False).planned] == ["skipped", "skipped"]


def test_slurm_launcher_config_composes():
    """conf/hydra/launcher/slurm.yaml: tasks_per_node = gpus_per_node = trainer.devices, nodes = trainer.num_nodes."""
    from omegaconf import OmegaConf

    def launcher(*over):
        from hydra import compose as hcompose
        from hydra import initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = hcompose("train", overrides=list(over), return_hydra_config=True)
        node = cfg.hydra.launcher
        return {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in node}

    compose([])  # registers fsseg's resolvers
    one = launcher("hydra/launcher=slurm", "method=apanet", "encoder=resnet50", "recipe=pascal")
    assert one["_target_"].endswith("SlurmLauncher")
    assert (one["gpus_per_node"], one["tasks_per_node"], one["nodes"]) == (1, 1, 1)
    assert one["max_num_timeout"] > 0 and one["name"] == "fsseg-apanet"
    many = launcher("hydra/launcher=slurm", "method=apanet", "encoder=resnet50", "recipe=pascal", "trainer=ddp", "trainer.devices=4",
                    "+trainer.num_nodes=2", "hydra.launcher.partition=gpu", "+sweep_name=apanet-table4")  # fmt: skip
    assert (many["gpus_per_node"], many["tasks_per_node"], many["nodes"]) == (4, 4, 2)
    assert many["partition"] == "gpu" and many["name"] == "fsseg-apanet-table4"
    local = launcher("hydra/launcher=submitit_local")
    assert local["_target_"].endswith("LocalLauncher") and local["gpus_per_node"] == 1 and local["tasks_per_node"] == 1


def test_slurm_commands_for_table4(tmp_path):
    from fsseg.cli.sweep import MultirunLauncher, plan

    sweep = load_sweep(find_sweep("apanet-table4", SWEEPS))
    planned = plan(sweep, None, tmp_path, [], str(CONF), apply=False)
    cmds = MultirunLauncher("slurm", ["hydra.launcher.partition=gpu"]).commands(planned)
    assert len(cmds) == 6  # one multirun per row, its 4 folds as Hydra sweep values
    runs, cmd, _ = cmds[3]
    assert len(runs) == 4 and "data.fold=0,1,2,3" in cmd and "aux.class_agnostic.n=3" in cmd
    assert "hydra/launcher=slurm" in cmd and "hydra.launcher.partition=gpu" in cmd and "resume=auto" in cmd
    sweep_dir = next(c for c in cmd if c.startswith("hydra.sweep.dir=")).split("=", 1)[1]
    assert Path(sweep_dir) == runs[0].run.run_dir.parent.resolve()


def test_make_targets_exist():
    text = (REPO / "Makefile").read_text()
    assert "reproduce-%:" in text and "list-tables:" in text and "tables:" in text
    out = subprocess.run(["make", "-n", "reproduce-apanet-table4", "PROFILE=embedded"], cwd=REPO, check=False, capture_output=True,
                         text=True, env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    assert "fsseg-sweep apanet-table4 --profile embedded" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(["make", "-n", "compare-apanet", "compare-celp"], cwd=REPO, check=False, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    for line in ("apanet-table4 --profile folds", "celp-table1 --profile folds", "celp-table5 --profile folds"):
        assert f"fsseg-sweep {line}" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(["make", "-n", "bias-apanet"], cwd=REPO, check=False, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    rows = [r.label for r in load_sweep(find_sweep("apanet-table4")).rows_run("folds")]
    assert f'fsseg-bias apanet-table4 --profile folds --rows "{rows[0]}" "{rows[3]}"' in out.stdout, out.stdout
    out = subprocess.run(["make", "-n", "bias-celp"], cwd=REPO, check=False, capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""})  # fmt: skip
    assert "fsseg-bias celp-table1 --profile folds" in out.stdout, out.stdout


def test_sweep_entry_point_installed():
    assert (Path(sys.executable).parent / "fsseg-sweep").is_file()


def test_local_launch_order_is_seed_major(tmp_path):
    """The local launcher runs seeds outermost, then folds, then rows: an interrupted sweep has every row compared
    on the same (seed, fold) points (apanet-table4's `folds` profile: 6 rows x 4 folds x 3 seeds)."""
    from fsseg.cli.sweep import breadth_first, plan

    sweep = load_sweep(SWEEPS / "apanet" / "table4.yaml")
    planned = plan(sweep, "folds", tmp_path, [], str(CONF), apply=False)
    ordered = breadth_first(planned, sweep.effective_grid("folds"))
    assert len(ordered) == 72
    points = [(p.run.point["seed"], p.run.point["data.fold"], p.run.row.label) for p in ordered]
    assert points[:7] == [(0, 0, f"n = {n}" if n else "n = 0 (baseline)") for n in range(6)] + [(0, 1, "n = 0 (baseline)")]
    assert points == sorted(points, key=lambda t: (t[0], t[1], [r.label for r in sweep.rows].index(t[2])))


def test_interrupt_with_parallel_jobs_stops_the_running_children(tmp_path, monkeypatch):
    """SIGTERM/Ctrl-C of a `--jobs 2` sweep ends the running runs at once (it used to wait for them, and for the
    queued ones, while leaving the thread pool) and marks them interrupted."""
    import _thread
    import signal
    import threading

    from fsseg.cli.sweep import LocalLauncher, plan

    sweep = load_sweep(SWEEPS / "apanet" / "table4.yaml")
    todo = plan(sweep, "folds", tmp_path, [], str(CONF), apply=False)[:4]
    for p in todo:
        p.run.run_dir.mkdir(parents=True, exist_ok=True)
    launcher = LocalLauncher(jobs=2, gpus=[])
    monkeypatch.setattr(launcher, "command", lambda p: ["sleep", "60"])
    # interrupt_main does nothing where SIGINT is ignored (a test run started in the background by a
    # non-interactive shell inherits SIG_IGN): install Python's handler for the duration of the test
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.5, _thread.interrupt_main)
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            launcher.launch(todo)
    finally:
        signal.signal(signal.SIGINT, old)
    assert time.monotonic() - start < 20
    assert [p.status for p in todo[:2]] == ["interrupted", "interrupted"]
    assert all(p.status == "pending" for p in todo[2:])  # never started
    assert not launcher._procs or all(proc.poll() is not None for proc in launcher._procs)


def test_bias_scores_base_class_subsets_on_both_splits(synth_root, in_tmp):
    """fsseg-bias: each finished run's best checkpoint on novel episodes whose queries hold a base class or none,
    on the training and the evaluation split; the table row is the per-run records' difference of differences;
    a second call re-uses them."""
    from fsseg.cli.bias import main as bias_main
    from fsseg.cli.sweep import run_sweep
    from fsseg.data.manifest import EpisodeManifest
    from fsseg.data.sources import PascalVOC

    path = _tiny_sweep(in_tmp, synth_root, [{"label": "dim 32", "overrides": []}])
    out = in_tmp / "out"
    run_sweep(load_sweep(path), out=out, render=False)
    run_dir = out / "demo-table1" / "paper" / "dim-32" / "data.fold-0_seed-0"
    assert bias_main([str(path), "--out", str(out), "--episodes", "6"]) == 0
    src = PascalVOC(synth_root)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    base = set(range(6, 21))
    miou = {}
    for split in ("train", "val"):
        names = src.item_names(split)
        for subset in ("with_base", "without_base"):
            d = run_dir / "bias" / f"{split}-{subset}"
            rec = json.loads((d / "metrics.json").read_text())
            man = EpisodeManifest.load(json.loads((d / "provenance.json").read_text())["manifest"]["path"])
            assert rec["episodes"] == 6 and man.split == split and rec["manifest_hash"] == man.hash
            for ep in man.episodes:  # the query's labels, read directly: a base class with >= min_pixels or not
                _, label = src.load(split, names.index(ep.query))
                counts = {int(c): int((label == c).sum()) for c in set(label.ravel().tolist()) - {0, 255}}
                has_base = any(n >= cfg["data"]["min_pixels"] for c, n in counts.items() if c in base)
                assert ep.class_id in range(1, 6) and has_base == (subset == "with_base"), (split, subset, ep)
            miou[split, subset] = 100 * rec["metrics"]["miou"]
    bias = (miou["train", "without_base"] - miou["train", "with_base"]) - (
        miou["val", "without_base"] - miou["val", "with_base"])  # fmt: skip
    md = (out / "demo-table1" / "paper" / "bias.md").read_text()
    test = 100 * json.loads((run_dir / "metrics.json").read_text())["metrics"]["miou"]
    cells = [test, miou["train", "with_base"], miou["train", "without_base"], miou["val", "with_base"],
             miou["val", "without_base"], bias]  # fmt: skip
    assert "| dim 32 | 1 | " + " | ".join(f"{v:.1f}" for v in cells) + " | — |" in md
    stamp = (run_dir / "bias" / "train-with_base" / "metrics.json").stat().st_mtime_ns
    assert bias_main([str(path), "--out", str(out), "--episodes", "6"]) == 0
    assert (run_dir / "bias" / "train-with_base" / "metrics.json").stat().st_mtime_ns == stamp
    # --base-control: the same checkpoint on base-class episodes of the evaluation split, one more column
    assert bias_main([str(path), "--out", str(out), "--episodes", "6", "--base-control"]) == 0
    assert (run_dir / "bias" / "train-with_base" / "metrics.json").stat().st_mtime_ns == stamp  # the four re-used
    d = run_dir / "bias" / "base-val"
    rec = json.loads((d / "metrics.json").read_text())
    man = EpisodeManifest.load(json.loads((d / "provenance.json").read_text())["manifest"]["path"])
    assert rec["episodes"] == 6 and man.split == "val" and {ep.class_id for ep in man.episodes} <= base
    row = next(line for line in (out / "demo-table1" / "paper" / "bias.md").read_text().splitlines() if line.startswith("| dim 32 |"))
    assert row.endswith(f" | — | {100 * rec['metrics']['miou']:.1f} |") and "| base |" in (out / "demo-table1" / "paper" / "bias.md").read_text()
    assert bias_main([str(path), "--out", str(out), "--episodes", "7", "--cached-only"]) == 0  # 7: none on disk
    assert bias_main([str(path), "--out", str(out), "--episodes", "6", "--eval-seed", "5", "--cached-only"]) == 0
    assert "| dim 32 | 0 | …" in (out / "demo-table1" / "paper" / "bias.md").read_text()  # other episodes: none
    assert "| dim 32 | 0 | …" in (out / "demo-table1" / "paper" / "bias.md").read_text()
    assert (run_dir / "bias" / "train-with_base" / "metrics.json").stat().st_mtime_ns == stamp
    assert bias_main([str(path), "--out", str(out), "--rows", "nope"]) == 2


def test_a_run_another_table_finished_is_reused_not_retrained(synth_root, in_tmp):
    """Two tables sharing one computation (same resolved config but directory, sweep name, logger): the second
    copies the first's finished run (checkpoints linked) instead of training; --no-reuse trains it."""
    from fsseg.cli.sweep import run_sweep
    from fsseg.provenance import read_metrics
    from fsseg.sweeps import run_identity, run_status

    out = in_tmp / "out"
    first = load_sweep(_tiny_sweep(in_tmp, synth_root, [{"label": "dim 32", "overrides": []}]))
    assert [p.status for p in run_sweep(first, out=out, render=False).planned] == ["done"]
    doc = yaml.safe_load(first.path.read_text())
    doc.update(name="demo-table2", rows=[{"label": "other label", "overrides": ["logger=csv"]},
                                         {"label": "dim 16", "overrides": ["head.reduce_dim=16"]}])  # fmt: skip
    second = load_sweep(_write(in_tmp, doc, "demo/table2.yaml"))
    assert [p.status for p in run_sweep(second, out=out, dry_run=True, render=False).planned] == ["reused", "pending"]
    assert [p.status for p in run_sweep(second, out=out, dry_run=True, render=False, reuse=False).planned] == [
        "pending", "pending"]  # fmt: skip
    # another output root is searched only when named (--reuse-from)
    other = in_tmp / "elsewhere"
    assert [p.status for p in run_sweep(second, out=other, dry_run=True, render=False).planned] == ["pending", "pending"]
    planned = run_sweep(second, out=other, dry_run=True, render=False, reuse_from=[out]).planned
    assert [p.status for p in planned] == ["reused", "pending"] and planned[0].source.parent.parent.parent.parent == out

    src = out / "demo-table1" / "paper" / "dim-32" / "data.fold-0_seed-0"
    evaluation = src / "bias" / "val-with_base"  # what fsseg-bias caches inside a run: copied with it, complete
    evaluation.mkdir(parents=True)
    (evaluation / "metrics.json").write_text('{"metrics": {"miou": 0.25}, "episodes": 300}')
    (evaluation / "config.yaml").write_text("seed: 0\n")
    outcome = run_sweep(second, out=out, render=True)
    assert [p.status for p in outcome.planned] == ["reused", "done"]
    dst = out / "demo-table2" / "paper" / "other-label" / "data.fold-0_seed-0"
    assert read_metrics(dst) == read_metrics(src)
    assert os.path.samefile(dst / "checkpoints" / "best.ckpt", src / "checkpoints" / "best.ckpt")  # hard link
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    assert cfg["run_dir"] == str(dst.resolve()) and cfg["sweep_name"] == "demo-table2"
    assert run_identity(cfg) == run_identity(yaml.safe_load((src / "config.yaml").read_text()))
    assert json.loads((dst / "sweep.json").read_text())["reused_from"] == str(src)
    copied = dst / "bias" / "val-with_base"
    assert sorted(f.name for f in copied.iterdir()) == ["config.yaml", "metrics.json"]
    assert read_metrics(copied) == read_metrics(evaluation)
    assert run_status(dst, cfg) == "finished"
    assert [p.status for p in run_sweep(second, out=out, dry_run=True, render=False).planned] == ["skipped", "skipped"]
    md = (out / "demo-table2" / "paper" / "table.md").read_text()
    assert f"{100 * read_metrics(src)['metrics']['miou']:.1f}" in md


def test_options_spelt_out_at_their_default_leave_finished_runs_finished(tmp_path):
    """A finished run recorded before conf/ named an option (the constructor's default applied) stays finished
    when the option appears at its default (scale_range: a list in YAML, a tuple default), and is stale when
    the option takes another value."""
    import copy

    from fsseg.provenance import write_json_atomic
    from fsseg.sweeps import compose_run_config, config_diff, run_identity, run_status, without_defaults

    run_dir = tmp_path / "run"
    expected = compose_run_config(["experiment=pfenet_effl0_synth"], run_dir, CONF)
    assert expected["data"]["scale_range"] == [0.9, 1.1]
    recorded = copy.deepcopy(expected)
    del recorded["data"]["scale_range"], recorded["data"]["hflip_p"]
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    write_json_atomic(run_dir / "metrics.json", {"metrics": {"miou": 0.5}})
    expected["data"]["eval_queries"] = "all"  # an option conf/ did not name before, at its default
    assert run_status(run_dir, expected) == "finished" and run_identity(expected) == run_identity(recorded)
    expected["data"]["eval_queries"] = "with_base"
    assert run_status(run_dir, expected) == "stale"
    assert config_diff(without_defaults(recorded), without_defaults(expected)) == [
        "data.eval_queries: '<absent>' -> 'with_base'"]  # fmt: skip
    expected["data"]["eval_queries"] = "all"
    expected["data"]["scale_range"] = [0.8, 1.1]
    assert run_status(run_dir, expected) == "stale"
