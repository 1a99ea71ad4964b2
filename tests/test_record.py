"""fsseg-record: finished runs kept without weights (what a table, fsseg-bias and the bias study read), and
restored as finished runs that a sweep skips, a table renders and fsseg-bias re-uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_sweeps import _tiny_sweep, in_tmp  # noqa: F401  (fixture)

from fsseg.cli.record import RECORD_FILE, main, restore, save
from fsseg.sweeps import load_sweep


def _run(d: Path, miou: float | None, extra: dict[str, bytes] | None = None) -> Path:
    """A fake run directory: what fsseg-train writes at its start, metrics.json when it finished."""
    files = {"config.yaml": b"seed: 0\n", "provenance.json": b"{}", "train.log": b"log\n",
             "checkpoints/best.ckpt": b"w" * 10, "wandb/run/x.wandb": b"x", "csv/metrics.csv": b"epoch\n0\n",
             "bias/train-with_base/config.yaml": b"seed: 0\n", "bias/train-with_base/provenance.json": b"{}",
             "bias/train-with_base/metrics.json": b'{"metrics": {"miou": 0.25}}', **(extra or {})}  # fmt: skip
    if miou is not None:
        files["metrics.json"] = json.dumps({"metrics": {"miou": miou}}).encode()
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return d


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_save_keeps_finished_runs_without_weights_and_restore_brings_them_back(tmp_path):
    out, rec = tmp_path / "out", tmp_path / "results"
    done = _run(out / "t1" / "p" / "row" / "fold-0", 0.5, {"big.json": b"0" * 2048, "fig.png": b"png"})
    _run(out / "t1" / "p" / "row" / "fold-1", None)  # started, not finished
    for name in ("sweep.json", ".hydra/overrides.yaml"):  # launched and interrupted before fsseg-train wrote anything
        (out / "t1" / "p" / "row" / "fold-2" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "t1" / "p" / "row" / "fold-2" / name).write_text("{}")
    _run(out / "t1" / "p" / "_stale" / "row" / "fold-0.old", 0.1)  # set aside
    (out / "t1" / "p" / "table.md").write_text("| row | 50.0 |\n")
    (out / "t1" / "p" / "row" / "multirun-x.log").write_text("log\n")

    assert main(["save", str(out), str(rec), "--max-kib", "1"]) == 0
    run = rec / "t1" / "p" / "row" / "fold-0"
    assert _tree(rec) == {"t1/p/table.md", *(f"t1/p/row/fold-0/{f}" for f in (
        "config.yaml", "provenance.json", "metrics.json", "csv/metrics.csv", RECORD_FILE,
        "bias/train-with_base/config.yaml", "bias/train-with_base/provenance.json", "bias/train-with_base/metrics.json"))}  # fmt: skip
    meta = json.loads((run / RECORD_FILE).read_text())
    assert {x["path"] for x in meta["left_out"]} == {"big.json", "fig.png", "train.log", "checkpoints/", "wandb/"}
    assert set(meta["files"]) == {f for f in _tree(done) if f in _tree(run)}
    assert save(out, rec, max_kib=1) == {"recorded": 0, "unchanged": 1, "unfinished": 2, "files": 9}

    # the run finished again, differently: its record is replaced as a whole (no evaluation of the old weights)
    (done / "bias" / "train-with_base" / "metrics.json").unlink()
    (done / "metrics.json").write_text(json.dumps({"metrics": {"miou": 0.6}}))
    assert save(out, rec, max_kib=1)["recorded"] == 1
    assert not (run / "bias" / "train-with_base" / "metrics.json").exists()
    assert json.loads((run / "metrics.json").read_text())["metrics"]["miou"] == 0.6

    # restore: into an empty root, over an unfinished run (set aside), never over a finished one
    back = tmp_path / "back"
    _run(back / "t1" / "p" / "row" / "fold-0", None)
    assert restore(rec, back) == {"restored": 1, "kept": 0, "set_aside": 1, "unrecorded": 1}
    assert (back / "t1" / "p" / "row" / "fold-0" / "metrics.json").read_bytes() == (done / "metrics.json").read_bytes()
    assert list((back / "t1" / "p" / "row" / "_stale").glob("fold-0.*/checkpoints/best.ckpt"))
    assert (back / "t1" / "p" / "table.md").is_file()
    (back / "t1" / "p" / "row" / "fold-0" / "metrics.json").write_text("{}")
    assert restore(rec, back) == {"restored": 0, "kept": 1, "set_aside": 0, "unrecorded": 1}
    assert (back / "t1" / "p" / "row" / "fold-0" / "metrics.json").read_text() == "{}"


@pytest.mark.parametrize("argv, message", [
    (["save", "nowhere", "r"], "nowhere is not a folder"),
    (["restore", "nowhere", "o"], "nowhere is not a folder"),
    (["save", ".", "r", "--max-kib", "0"], "--max-kib must be >= 1, got 0"),
])  # fmt: skip
def test_bad_arguments_are_named(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2 and message in capsys.readouterr().err


def test_a_restored_sweep_is_finished_renders_the_same_table_and_reuses_fsseg_bias(synth_root, in_tmp, capsys):  # noqa: F811
    from fsseg.cli.bias import main as bias_main
    from fsseg.cli.sweep import run_sweep
    from fsseg.runs import code_version, run_status

    path = _tiny_sweep(in_tmp, synth_root, [{"label": "dim 32", "overrides": []}])
    out, rec, back = in_tmp / "out", in_tmp / "results", in_tmp / "back"
    sweep = load_sweep(path)
    run_sweep(sweep, out=out, render=True)
    assert bias_main([str(path), "--out", str(out), "--episodes", "6"]) == 0
    bias_md = (out / "demo-table1" / "paper" / "bias.md").read_text()
    assert save(out, rec)["recorded"] == 1
    assert not list(rec.rglob("*.ckpt")) and restore(rec, back)["restored"] == 1

    run_dir = back / "demo-table1" / "paper" / "dim-32" / "data.fold-0_seed-0"
    assert run_status(run_dir, yaml.safe_load((run_dir / "config.yaml").read_text())) == "finished"
    prov = json.loads((run_dir / "provenance.json").read_text())
    (run_dir / "provenance.json").write_text(json.dumps({**prov, "code_version": "sha256:0123456789abcdef"}))
    message = run_sweep(sweep, out=back, dry_run=True, render=False).planned[0].message
    assert message == f"re-run: code changed (sha256:0123456789abcdef -> {code_version()})"  # not its directory
    (run_dir / "provenance.json").write_text(json.dumps(prov))
    outcome = run_sweep(sweep, out=back, render=True)
    assert [p.status for p in outcome.planned] == ["skipped"]
    table = (back / "demo-table1" / "paper" / "table.md").read_text()
    assert table == (out / "demo-table1" / "paper" / "table.md").read_text()
    assert _tree(run_dir) == _tree(rec / run_dir.relative_to(back))
    assert bias_main([str(path), "--out", str(back), "--episodes", "6"]) == 0  # the record's evaluations
    assert (back / "demo-table1" / "paper" / "bias.md").read_text() == bias_md
    assert bias_main([str(path), "--out", str(back), "--episodes", "7"]) == 2  # a new one needs the weights
    capsys.readouterr()
    assert main(["restore", str(rec), str(in_tmp / "third")]) == 0
    assert f"1 record(s) made with code version {code_version()} (this code)" in capsys.readouterr().out


def test_checkpoint_of_a_record_is_named_as_such(tmp_path):
    from fsseg.cli.evaluate import resolve_checkpoint
    from fsseg.errors import ConfigError

    run = _run(tmp_path / "out" / "r", 0.5)
    save(tmp_path / "out", tmp_path / "rec")
    with pytest.raises(ConfigError, match="is a record .* keeps results, not weights"):
        resolve_checkpoint(tmp_path / "rec" / "r", "best")
    with pytest.raises(ConfigError, match=r"does not exist \(checkpoint= best"):
        resolve_checkpoint(run, "last")
