"""Issue 14 (reliability): runs that train nothing, resume rules, partial files, readable errors, kill -9 resume.

Tiny PFENet runs on the embedded benchmark (64 px, 2 steps per epoch); CLI behaviour through subprocesses.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from fsseg_testing import REPO, compose, tiny_overrides

from fsseg.cli.evaluate import evaluate, load_run_config
from fsseg.cli.train import run
from fsseg.errors import ConfigError, OutputError, RunError


def _cfg(synth_root, tmp_path, **extra):
    return compose(tiny_overrides(synth_root, tmp_path / "cache", **extra))


class Killed(Exception):
    pass


class DieAtSecondEpoch(L.Callback):
    """A crash at the start of epoch 2 (after epoch 1's checkpoints): the process ends with no metrics.json."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise Killed


TWO = {"trainer.max_epochs": 2, "resume": "auto"}


def _interrupt(synth_root, tmp_path, run_dir, **extra):
    with pytest.raises(Killed):
        run(_cfg(synth_root, tmp_path, **{**TWO, **extra}), run_dir, extra_callbacks=[DieAtSecondEpoch()])
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()  # recorded when the run started
    return run_dir


@pytest.fixture
def interrupted(synth_root, tmp_path):
    """A 2-epoch run that died after epoch 1: config.yaml and checkpoints, no metrics.json."""
    return _interrupt(synth_root, tmp_path, tmp_path / "run")


def _cli(*args, cwd, env=None, timeout=600):
    exe = Path(sys.executable).parent
    env = {**os.environ, "FSSEG_CONF": str(REPO / "conf"), **(env or {})}
    return subprocess.run([str(exe / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


# ------------------------------------------------------------------------- 2. runs that trained nothing
def test_zero_epochs_is_refused_before_any_work(synth_root, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=0: the run would train nothing.*train=false"):
        run(_cfg(synth_root, tmp_path, **{"trainer.max_epochs": 0}), tmp_path / "zero")
    assert not (tmp_path / "zero" / "metrics.json").exists()
    assert not (tmp_path / "cache").exists()  # refused before the labels were even scanned


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-0.001"])
def test_non_finite_or_non_positive_learning_rate_is_refused_by_name(synth_root, tmp_path, value):
    with pytest.raises(ConfigError, match=rf"optim.base_lr={value}: expected a finite number > 0"):
        run(_cfg(synth_root, tmp_path, **{"optim.base_lr": value}), tmp_path / "lr")
    assert not (tmp_path / "lr" / "metrics.json").exists()


def test_evaluation_only_is_explicit(synth_root, tmp_path):
    metrics = run(_cfg(synth_root, tmp_path, train="false", **{"trainer.max_epochs": 0}), tmp_path / "evalonly")
    record = json.loads((tmp_path / "evalonly" / "metrics.json").read_text())
    assert record["metrics"]["trained"] is False and record["metrics"]["checkpoint"] is None
    assert metrics["episodes"] == 12 and not (tmp_path / "evalonly" / "checkpoints").exists()


def test_no_metrics_from_a_checkpoint_with_non_finite_weights(synth_root, tmp_path):
    class PoisonBeforeValidation(L.Callback):  # the weights the checkpoint of this epoch will hold
        def on_validation_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.decoder.cls[-1].weight.fill_(float("inf"))

    run_dir = tmp_path / "inf"
    with pytest.raises(RunError, match=r"checkpoint .*last.ckpt holds non-finite weights"):
        run(_cfg(synth_root, tmp_path, test_checkpoint="last"), run_dir, extra_callbacks=[PoisonBeforeValidation()])
    assert not (run_dir / "metrics.json").exists()
    with pytest.raises(RunError, match="non-finite weights"):  # fsseg-eval refuses it too
        evaluate(load_run_config(run_dir), run_dir / "checkpoints" / "last.ckpt", compose([], "eval").trainer,
                 tmp_path / "eval")  # fmt: skip
    assert not (tmp_path / "eval" / "metrics.json").exists()


# -------------------------------------------------------------------------------------- 3. resume rules
def test_resume_with_another_seed_is_refused_naming_seed(synth_root, tmp_path, interrupted):
    with pytest.raises(RunError, match=r"resume=auto: .*config.yaml was recorded with another config .*seed: 0 -> 1"):
        run(_cfg(synth_root, tmp_path, seed=1, **TWO), interrupted)
    with pytest.raises(RunError, match=r"optim.base_lr: 0.001 -> 0.002"):
        run(_cfg(synth_root, tmp_path, **{"optim.base_lr": 0.002}, **TWO), interrupted)


def test_copied_run_directory_resumes_and_tests_its_own_checkpoint(synth_root, tmp_path, interrupted):
    copy = tmp_path / "copy"
    shutil.copytree(interrupted, copy)
    shutil.rmtree(interrupted)  # the original is gone: a moved run directory
    metrics = run(_cfg(synth_root, tmp_path, **TWO), copy)
    assert metrics["checkpoint"] == "checkpoints/best.ckpt"  # relative to the run directory
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    state = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    assert all(str(interrupted) not in json.dumps(v, default=str) for v in state.values())
    assert not interrupted.exists()


def test_truncated_last_checkpoint_is_named_moved_aside_and_the_run_goes_on(synth_root, tmp_path, interrupted, caplog):
    last = interrupted / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="fsseg.train"):
        metrics = run(_cfg(synth_root, tmp_path, **TWO), interrupted)
    lines = [r.getMessage() for r in caplog.records if "last.ckpt" in r.getMessage()]
    assert len(lines) == 1 and "is unreadable" in lines[0] and "resuming from best.ckpt" in lines[0], lines
    aside = list((interrupted / "checkpoints").glob("last.corrupt-*.ckpt"))
    assert len(aside) == 1 and aside[0].name in lines[0]
    assert (interrupted / "metrics.json").is_file() and metrics["episodes"] == 12


def test_resume_keeps_the_csv_rows(synth_root, tmp_path):
    part = _interrupt(synth_root, tmp_path, tmp_path / "part", logger="csv", **{"trainer.log_every_n_steps": 1})
    first = list(csv.DictReader((part / "csv" / "metrics.csv").open()))
    assert first and {r["epoch"] for r in first if r.get("val/miou")} == {"0"}
    run(_cfg(synth_root, tmp_path, **TWO, logger="csv", **{"trainer.log_every_n_steps": 1}), part)
    rows = list(csv.DictReader((part / "csv" / "metrics.csv").open()))
    key = lambda r: (r["step"], r["epoch"], r.get("train/loss", ""), r.get("val/miou", ""))
    assert [key(r) for r in rows[: len(first)]] == [key(r) for r in first]  # the first attempt's rows kept
    assert {r["epoch"] for r in rows if r.get("val/miou")} == {"0", "1"} and any(r.get("test/miou") for r in rows)
    assert len({key(r) for r in rows}) == len(rows)  # no step logged twice


# ------------------------------------------------------------------------------ 4. partial files, eval
def test_full_disk_leaves_no_file_under_a_final_name(synth_root, tmp_path, monkeypatch):
    import fsseg.io

    real_fsync = os.fsync

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".ckpt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(fsseg.io.os, "fsync", full_disk)
    run_dir = tmp_path / "full"
    with pytest.raises(OutputError, match=r"cannot write (best|last).ckpt in .*checkpoints: no space left "
                                          r"\(.* MB free, .* MB needed\)"):  # fmt: skip
        run(_cfg(synth_root, tmp_path), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []  # no partial, no temp file
    assert not (run_dir / "metrics.json").exists()


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    from fsseg.io import write_atomic

    target = tmp_path / "out" / "metrics.json"
    write_atomic(target, "old")

    def no_space(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fsseg.io.os.fsync", no_space)
    with pytest.raises(OutputError, match=rf"cannot write metrics.json in {tmp_path / 'out'}: no space left"):
        write_atomic(target, "x" * 3_000_000)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_eval_on_an_interrupted_run_and_unknown_override_keys(interrupted, tmp_path):
    cfg = load_run_config(interrupted)
    metrics = evaluate(cfg, interrupted / "checkpoints" / "last.ckpt", compose([], "eval").trainer, tmp_path / "ev")
    assert metrics["episodes"] == 12 and (tmp_path / "ev" / "metrics.json").is_file()
    with pytest.raises(ConfigError, match=r"overrides: unknown key 'bogus'"):
        load_run_config(interrupted, {"bogus": 1})
    assert load_run_config(interrupted, {"data.shots": 2}).data.shots == 2


# --------------------------------------------------------------------------------- 5. readable errors
def test_config_error_prints_its_message_without_a_traceback(tmp_path):
    proc = _cli("fsseg-train", "optim.base_lr=nan", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "fsseg-train: error: optim.base_lr=nan: expected a finite number > 0"
    assert "Traceback" not in proc.stderr + proc.stdout and "Error executing job" not in proc.stderr
    assert "optim.base_lr=nan" in (tmp_path / "r" / "train.log").read_text()  # the run's log records it
    proc = _cli("fsseg-train", f"hydra.run.dir={tmp_path / 'r2'}", cwd=tmp_path)  # no data/ in this folder
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"looked at {tmp_path}/data/synth" in proc.stderr and "`make synth` creates" in proc.stderr
    proc = _cli("fsseg-train", "optim.base_lr=nan", f"hydra.run.dir={tmp_path / 'r3'}", cwd=tmp_path,
                env={"HYDRA_FULL_ERROR": "1"})  # fmt: skip
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


# ------------------------------------------------------------------------------------- kill -9 resume
def _tiny_cli(synth_root, cache, run_dir):
    over = tiny_overrides(synth_root, cache, **{"trainer.max_epochs": 3, "resume": "auto", "logger": "csv",
                                                "trainer.log_every_n_steps": 1})  # fmt: skip
    return ["fsseg-train", *over, f"hydra.run.dir={run_dir}"]


def _kill_and_finish(synth_root, tmp_path, kills: int) -> None:
    """``kills`` times: start the run, wait until it has trained (a checkpoint or a later epoch), then kill -9
    at a random moment; then run it to the end. metrics.json must equal the uninterrupted run's bit for bit, and
    csv/metrics.csv hold the same rows."""
    exe = Path(sys.executable).parent
    env = {**os.environ, "FSSEG_CONF": str(REPO / "conf")}
    ref = tmp_path / "ref"
    proc = _cli(*_tiny_cli(synth_root, tmp_path / "cache", ref), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("epoch 1/3") == 1 and out.count("`Trainer.fit` stopped") == 1  # each line printed once
    assert "val/miou" in out.split("epoch 1/3")[1].splitlines()[0]  # one line per epoch with its metrics
    rng = random.Random(14)
    run_dir = tmp_path / "killed"
    cmd = _tiny_cli(synth_root, tmp_path / "cache", run_dir)
    for _ in range(kills):
        p = subprocess.Popen([str(exe / cmd[0]), *cmd[1:]], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
        start = time.monotonic()
        while not (run_dir / "checkpoints").is_dir() and p.poll() is None and time.monotonic() - start < 120:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the remaining epochs, the test or a checkpoint write
        assert p.poll() is None, "the run ended before the kill"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert not (run_dir / "metrics.json").exists()
    proc = _cli(*cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    assert a["metrics"] == b["metrics"] and a["manifest_hash"] == b["manifest_hash"]
    rows = [list(csv.DictReader((d / "csv" / "metrics.csv").open())) for d in (ref, run_dir)]
    drop_time = lambda r: {k: v for k, v in r.items() if "time" not in k}
    assert [drop_time(r) for r in rows[0]] == [drop_time(r) for r in rows[1]]  # every step once, same values


def test_kill_9_once_then_finish_equals_the_uninterrupted_run(synth_root, tmp_path):
    _kill_and_finish(synth_root, tmp_path, kills=1)


@pytest.mark.slow
def test_kill_9_five_times_then_finish_equals_the_uninterrupted_run(synth_root, tmp_path):
    _kill_and_finish(synth_root, tmp_path, kills=5)


def test_finished_sweep_runs_stay_finished_across_the_new_classes_and_train_flag():
    from fsseg.sweeps import without_defaults

    old = {"seed": 0, "callbacks": {"last": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "filename": "last"}},
           "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "csv"}}}  # fmt: skip
    new = {"seed": 0, "train": True, "callbacks": {"last": {"_target_": "fsseg.callbacks.RunCheckpoint", "filename": "last"}},
           "logger": {"csv": {"_target_": "fsseg.callbacks.RunCSVLogger", "name": "csv"}}}  # fmt: skip
    assert without_defaults(old) == without_defaults(new)
    assert without_defaults({**old, "train": False}) != without_defaults(new)  # evaluation only is another run
