"""A run knows it is finished (fsseg.runs): a re-run `fsseg-train -m` runs only what is missing; a finished run
of other code is re-run; a failing run leaves FAILED; wandb is finished on failure too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from fsseg_testing import CONF, tiny_overrides

from fsseg.errors import ConfigError
from fsseg.runs import FAILED_FILE, code_version, guard_run, package_digest, run_status


def test_package_digest_follows_the_source(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.md").write_text("not code\n")
    first = package_digest(pkg)
    assert first.startswith("sha256:") and package_digest(pkg) == first
    (pkg / "notes.md").write_text("edited\n")  # not source: same version
    assert package_digest(pkg) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")
    assert package_digest(pkg) != first
    assert code_version() == package_digest(Path(__import__("fsseg").__file__).parent)


def test_guard_run_marks_failure_and_finishes_wandb(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(run=object(), finish=lambda exit_code: calls.append(exit_code))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="bad fold 7"), guard_run(run_dir):
        raise ValueError("bad fold 7")
    text = (run_dir / FAILED_FILE).read_text()
    assert text.startswith("error: ValueError: bad fold 7") and "Traceback" in text
    assert calls == [1] and run_status(run_dir) == "failed"
    with guard_run(run_dir):  # a later attempt clears the marker; wandb finished with exit code 0
        assert not (run_dir / FAILED_FILE).exists()
    assert calls == [1, 0]
    with pytest.raises(KeyboardInterrupt), guard_run(run_dir):  # interrupted is not failed
        raise KeyboardInterrupt
    assert not (run_dir / FAILED_FILE).exists() and calls == [1, 0, 1]


def _multirun(synth_root, tmp_path, sweep_dir) -> str:
    exe = Path(sys.executable).parent / "fsseg-train"
    args = [*tiny_overrides(synth_root, tmp_path / "cache"), "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=seed-${seed}", "resume=auto"]  # fmt: skip
    env = {**os.environ, "FSSEG_CONF": str(CONF)}
    proc = subprocess.run([str(exe), "-m", *args], cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_rerun_multirun_runs_only_missing_runs_and_reruns_other_code(synth_root, tmp_path):
    sweep = tmp_path / "multirun"
    _multirun(synth_root, tmp_path, sweep)
    s0, s1 = sweep / "seed-0", sweep / "seed-1"
    for d in (s0, s1):
        assert (d / "metrics.json").is_file()
        assert json.loads((d / "provenance.json").read_text())["code_version"] == code_version()
    stamp0 = (s0 / "metrics.json").stat().st_mtime_ns
    (s1 / "metrics.json").unlink()  # seed 1 was interrupted before it finished

    out = _multirun(synth_root, tmp_path, sweep)  # the same command again: only seed 1 runs
    assert f"{s0.resolve()} is finished" in out or f"{s0} is finished" in out, out[-2000:]
    assert (s0 / "metrics.json").stat().st_mtime_ns == stamp0
    assert (s1 / "metrics.json").is_file()
    stamp1 = (s1 / "metrics.json").stat().st_mtime_ns

    prov = json.loads((s0 / "provenance.json").read_text())  # seed 0 as if made by other code
    prov["code_version"] = "sha256:0000000000000000"
    (s0 / "provenance.json").write_text(json.dumps(prov))
    out = _multirun(synth_root, tmp_path, sweep)
    assert "code changed (sha256:0000000000000000 -> " in out, out[-2000:]
    assert (s0 / "metrics.json").stat().st_mtime_ns != stamp0  # re-run, not skipped
    assert json.loads((s0 / "provenance.json").read_text())["code_version"] == code_version()
    assert (s1 / "metrics.json").stat().st_mtime_ns == stamp1  # finished with this code: skipped
    (stale,) = (sweep / "_stale").glob("seed-0.*")  # the other code's run is set aside, not lost
    assert json.loads((stale / "provenance.json").read_text())["code_version"] == "sha256:0000000000000000"
    cfg = yaml.safe_load((s0 / "config.yaml").read_text())
    assert cfg["seed"] == 0 and cfg["run_dir"] == str(s0.resolve())


def test_default_multirun_directory_is_the_same_every_time():
    """No timestamp in the multirun directory: the same command finds its earlier runs."""
    from hydra import compose, initialize_config_dir

    from fsseg.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=apanet_effl0_synth"], return_hydra_config=True)
    assert "now:" not in cfg.hydra.sweep._get_node("dir")._value()
    assert "resume" in cfg.hydra.job.config.override_dirname.exclude_keys


def test_sweep_status_and_reuse_are_keyed_on_code_version(tmp_path):
    """fsseg-sweep's view: a finished run of other code is stale (re-run, with the reason), and is not re-used by
    another table; a run recorded before code versions were is judged by its config alone."""
    from fsseg.provenance import write_json_atomic
    from fsseg.runs import why_stale
    from fsseg.sweeps import compose_run_config, finished_runs

    run_dir = tmp_path / "out" / "t" / "paper" / "row" / "seed-0"
    cfg = compose_run_config(["experiment=pfenet_effl0_synth"], run_dir, CONF)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_json_atomic(run_dir / "metrics.json", {"metrics": {"miou": 0.5}})
    assert run_status(run_dir, cfg) == "finished" and list(finished_runs(tmp_path / "out").values()) == [run_dir]
    write_json_atomic(run_dir / "provenance.json", {"code_version": code_version()})
    assert run_status(run_dir, cfg) == "finished"
    write_json_atomic(run_dir / "provenance.json", {"code_version": "sha256:0123456789abcdef"})
    assert run_status(run_dir, cfg) == "stale" and finished_runs(tmp_path / "out") == {}
    assert why_stale(run_dir, cfg) == f"code changed (sha256:0123456789abcdef -> {code_version()})"
    assert run_status(run_dir, {**cfg, "resume": "auto"}) == "stale"  # resume alone does not matter ...
    write_json_atomic(run_dir / "provenance.json", {"code_version": code_version()})
    assert run_status(run_dir, {**cfg, "resume": "auto"}) == "finished"  # ... as the stale verdict was the code's


def test_accepted_code_version_counts_as_finished_only_when_vouched_for(tmp_path, monkeypatch, capsys):
    """FSSEG_ACCEPT_CODE (fsseg-sweep --accept-code) lets a researcher vouch for an older code version: its runs
    count as finished and are re-used; any other version stays stale; a malformed version is refused up front."""
    from fsseg.cli.sweep import main as sweep_main
    from fsseg.provenance import write_json_atomic
    from fsseg.runs import ACCEPT_CODE_ENV
    from fsseg.sweeps import compose_run_config, finished_runs

    run_dir = tmp_path / "out" / "t" / "paper" / "row" / "seed-0"
    cfg = compose_run_config(["experiment=pfenet_effl0_synth"], run_dir, CONF)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_json_atomic(run_dir / "metrics.json", {"metrics": {"miou": 0.5}})
    write_json_atomic(run_dir / "provenance.json", {"code_version": "sha256:0123456789abcdef"})
    monkeypatch.setenv(ACCEPT_CODE_ENV, "sha256:fedcba9876543210")  # another version: still stale
    assert run_status(run_dir, cfg) == "stale" and finished_runs(tmp_path / "out") == {}
    monkeypatch.setenv(ACCEPT_CODE_ENV, "sha256:fedcba9876543210, sha256:0123456789abcdef")
    assert run_status(run_dir, cfg) == "finished" and list(finished_runs(tmp_path / "out").values()) == [run_dir]
    monkeypatch.setenv(ACCEPT_CODE_ENV, "0123456789abcdef")
    with pytest.raises(ConfigError, match=r"FSSEG_ACCEPT_CODE=.*expected sha256:<16 hex digits>"):
        run_status(run_dir, cfg)
    monkeypatch.delenv(ACCEPT_CODE_ENV)
    assert sweep_main(["apanet-table4", "--profile", "embedded", "--dry-run", "--accept-code", "abc"]) == 2
    assert "['abc'] are not code versions" in capsys.readouterr().err


def test_one_path_spelt_two_ways_names_one_run(tmp_path):
    """'./data/synth' (the default data dir) and 'data/synth/' (FSSEG_DATA=data) are one dataset: the run is the same
    (finished stays finished, re-use finds it, a resume accepts it); another directory is another run."""
    import copy

    from fsseg.runs import config_diff, config_digest, run_identity, same_config, without_defaults
    from fsseg.sweeps import compose_run_config

    cfg = compose_run_config(["experiment=pfenet_effl0_synth"], tmp_path / "run", CONF)
    cfg["paths"]["data_dir"], cfg["data"]["source"]["root"] = "./data", "./data/synth"
    other = copy.deepcopy(cfg)
    other["paths"]["data_dir"], other["data"]["source"]["root"] = "data", "data//synth/"
    assert same_config(cfg, other) and run_identity(cfg) == run_identity(other)
    assert config_digest(cfg) == config_digest(other)
    assert config_diff(without_defaults(cfg), without_defaults(other)) == []
    moved = copy.deepcopy(cfg)
    moved["data"]["source"]["root"] = "./data/synth_latent40"
    assert not same_config(cfg, moved) and run_identity(cfg) != run_identity(moved)
    assert config_diff(without_defaults(cfg), without_defaults(moved)) == [
        "data.source.root: 'data/synth' -> 'data/synth_latent40'"]
    hub = copy.deepcopy(cfg)  # a URL keeps its spelling (normpath would fold its '//')
    hub["encoder"]["weights_url"] = "https://example.org/w.pth"
    assert without_defaults(hub)["encoder"]["weights_url"] == "https://example.org/w.pth"
