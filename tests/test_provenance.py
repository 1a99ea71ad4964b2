"""Run-directory records: atomic JSON, record contents and order, git information."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from fsseg import provenance as pv
from fsseg.errors import DataError

MANIFEST = {"hash": "sha256:abc123", "path": "data/synth/fold0_test.json", "episodes": 2}
CONFIG = "model:\n  name: pfenet\nseed: 0\n"


# ------------------------------------------------------------------ atomic JSON
def test_write_json_atomic_converts_tensors_numpy_and_nan(tmp_path):
    path = tmp_path / "sub" / "x.json"
    pv.write_json_atomic(
        path,
        {
            "t0": torch.tensor(0.25),
            "t1": torch.tensor([1.0, float("nan")]),
            "i": torch.tensor(3),
            "np": np.float32(0.5),
            "npi": np.int64(7),
            "arr": np.array([[1, 2]]),
            "nan": float("nan"),
            "inf": float("inf"),
            "tuple": (1, 2),
            "path": tmp_path,
            "nested": {"b": np.bool_(True)},
        },
    )
    data = json.loads(path.read_text())
    assert data == {
        "t0": 0.25,
        "t1": [1.0, None],
        "i": 3,
        "np": 0.5,
        "npi": 7,
        "arr": [[1, 2]],
        "nan": None,
        "inf": None,
        "tuple": [1, 2],
        "path": str(tmp_path),
        "nested": {"b": True},
    }
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_failed_serialisation_leaves_no_file(tmp_path):
    path = tmp_path / "metrics.json"
    # The long list is encoded (and written to the temp file) before the encoder reaches object().
    with pytest.raises(TypeError):
        pv.write_json_atomic(path, {"a": list(range(5000)), "z": object()})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_failed_serialisation_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    pv.write_json_atomic(path, {"miou": 0.5})
    with pytest.raises(TypeError):
        pv.write_json_atomic(path, {"miou": 0.6, "z": object()})
    assert json.loads(path.read_text()) == {"miou": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_crash_before_rename_leaves_no_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt  # e.g. the job is killed between writing and renaming

    monkeypatch.setattr(pv.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        pv.write_json_atomic(tmp_path / "metrics.json", {"miou": 0.5})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ run record
def _metrics():
    return {
        "miou": 0.6,
        "fbiou": 0.7,
        "fp_rate": 0.01,
        "fn_rate": 0.02,
        "class_iou": torch.tensor([0.6, float("nan")], dtype=torch.float64),
        "episodes": 2,
    }


def test_write_run_record_contents(tmp_path):
    run_dir = tmp_path / "run"
    assert pv.read_metrics(run_dir) is None
    seeds = {"seed": np.int64(3), "episode_seed": 321}
    out = pv.write_run_record(run_dir, CONFIG, seeds, MANIFEST, _metrics())
    assert out == run_dir / "metrics.json"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.json", "provenance.json"]
    assert (run_dir / "config.yaml").read_text() == CONFIG

    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["seeds"] == {"seed": 3, "episode_seed": 321}
    assert prov["manifest"] == MANIFEST
    for key in ("git", "python", "platform", "hostname", "versions", "cuda", "argv", "timestamp_utc"):
        assert key in prov, key
    assert prov["versions"]["torch"] == torch.__version__
    assert set(prov["versions"]) >= {"torch", "lightning", "timm", "torchmetrics", "albumentations", "hydra",
                                     "omegaconf", "numpy"}  # fmt: skip
    assert isinstance(prov["cuda"]["available"], bool)
    assert prov["threads"]["torch"] == torch.get_num_threads()  # a CPU re-run matches bit for bit only at this count

    met = pv.read_metrics(run_dir)
    assert met == json.loads((run_dir / "metrics.json").read_text())
    assert met["manifest_hash"] == MANIFEST["hash"]
    assert met["episodes"] == 2
    assert met["metrics"]["miou"] == 0.6
    assert met["metrics"]["class_iou"] == [0.6, None]  # NaN -> null
    assert "finished_utc" in met


def test_metrics_json_is_written_last(tmp_path, monkeypatch):
    order = []
    real = pv.write_atomic

    def spy(path, data):
        order.append(path.name)
        real(path, data)

    monkeypatch.setattr(pv, "write_atomic", spy)
    pv.write_run_record(tmp_path, CONFIG, {"seed": 0}, MANIFEST, _metrics())
    assert order == ["config.yaml", "provenance.json", "metrics.json"]


def test_rewriting_a_run_removes_the_old_marker_first(tmp_path):
    pv.write_run_record(tmp_path, CONFIG, {"seed": 0}, MANIFEST, _metrics())
    assert pv.read_metrics(tmp_path) is not None
    with pytest.raises(TypeError):
        pv.write_run_record(tmp_path, CONFIG, {"seed": 1}, MANIFEST, {"miou": object()})
    assert pv.read_metrics(tmp_path) is None  # the failed rerun is not marked finished
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_write_run_record_validates_manifest_and_warns_on_episode_mismatch(tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        pv.write_run_record(tmp_path, CONFIG, {}, {"hash": "h", "path": "p"}, {})
    with pytest.warns(UserWarning, match="5 episodes"):
        pv.write_run_record(tmp_path, CONFIG, {}, MANIFEST, {"miou": 0.1, "episodes": 5})


def test_read_metrics_rejects_corrupt_file(tmp_path):
    (tmp_path / "metrics.json").write_text('{"miou": 0.')
    with pytest.raises(DataError, match="metrics.json"):
        pv.read_metrics(tmp_path)


# ------------------------------------------------------------------------- git
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


def _git(repo, *args):
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com",
         "-c", "commit.gpgsign=false", *args],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


@needs_git
def test_git_sha_and_dirty_flag_in_a_temporary_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    sha = _git(repo, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", sha)

    rec = pv.collect(repo_dir=repo)
    assert rec["git"] == {"sha": sha, "dirty": False}
    (repo / "a.txt").write_text("two\n")
    assert pv.collect(repo_dir=repo)["git"] == {"sha": sha, "dirty": True}
    # a sub-directory of the checkout finds the same repository
    (repo / "sub").mkdir()
    assert pv.collect(repo_dir=repo / "sub")["git"]["sha"] == sha


@needs_git
def test_git_unknown_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert pv.collect(repo_dir=plain)["git"] == {"sha": "unknown", "dirty": None}
    # a repository without commits has no sha either
    empty = tmp_path / "empty"
    empty.mkdir()
    _git(empty, "init", "-q")
    assert pv.collect(repo_dir=empty)["git"]["sha"] == "unknown"
    # nonexistent directory
    assert pv.collect(repo_dir=tmp_path / "missing")["git"]["sha"] == "unknown"


def test_git_missing_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable on PATH
    assert pv.collect(repo_dir=tmp_path)["git"] == {"sha": "unknown", "dirty": None}


# --------------------------------------------------------------------- collect
def test_collect_fields_extra_and_missing_packages(monkeypatch):
    monkeypatch.setitem(pv._PACKAGES, "nonexistent", "fsseg-no-such-distribution")
    rec = pv.collect(extra={"seeds": {"seed": 1}, "python": "overridden"})
    assert rec["versions"]["nonexistent"] is None
    assert rec["versions"]["numpy"] == np.__version__
    assert rec["seeds"] == {"seed": 1}
    assert rec["python"] == "overridden"  # extra keys win
    assert isinstance(rec["argv"], list)
    assert rec["timestamp_utc"].endswith("+00:00")
    # the default repo_dir is the fsseg source tree: a sha or "unknown", never an exception
    assert rec["git"]["sha"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", rec["git"]["sha"])
    json.dumps(pv.to_jsonable(rec), allow_nan=False)  # everything is JSON
