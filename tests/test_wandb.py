"""wandb: offline runs land in the run directory with group (the sweep), tags and the resolved config; a run
with WANDB_MODE unset, no key and no network does not hang; the prediction-panel callback logs images."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fsseg_testing import REPO, compose, tiny_overrides


def _wandb_records(path: Path) -> list[bytes]:
    """Records of a wandb transaction log (.wandb): a 7-byte header, then 32 KiB blocks of LevelDB-log style
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    records, buf = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk, pos = data[pos : pos + length], pos + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            records.append(buf + chunk)
        elif kind == 0 and length == 0:
            pos += -pos % block
    return records


def _offline_records(run_dir: Path) -> dict:
    """Group, tags, config and logged keys of the offline run under run_dir/wandb/ (what `wandb sync` uploads)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    out: dict = {"config": {}, "history": set()}
    for data in _wandb_records(run_file):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["tags"] = rec.run.run_group, list(rec.run.tags)
            out["config"].update({i.key: i.value_json for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: i.value_json for i in rec.config.update})
        elif kind == "history":
            out["history"].update(i.key or "/".join(i.nested_key) for i in rec.history.item)
    return out


def test_group_defaults_to_method_outside_a_sweep(synth_root, tmp_path):
    cfg = compose(tiny_overrides(synth_root, tmp_path / "cache", logger="wandb"))
    assert cfg.logger.wandb.group == "pfenet"


@pytest.mark.parametrize("api_key", [None, "x" * 40], ids=["no-key", "key"])
def test_offline_run_without_network_has_group_tags_config_and_panels(synth_root, tmp_path, api_key):
    """fsseg-train with logger=wandb and callbacks=with_panels, WANDB_MODE unset, with or without a key, and every
    wandb/HTTP endpoint pointed at a black-holed address: environment_defaults() makes wandb offline, so the run
    finishes promptly; the offline run under <run dir>/wandb/ carries group = the sweep, the tags, the resolved
    config (LogRunConfig) and the prediction panel (QualitativePanels)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    if api_key:  # a configured key but no network: the 3 s probe sends the run offline instead of wandb's retries
        env["WANDB_API_KEY"] = api_key
    blackhole = "http://10.255.255.1:81"  # non-routable: connections would hang until a timeout, not fail fast
    env.update(WANDB_BASE_URL=blackhole, HTTP_PROXY=blackhole, HTTPS_PROXY=blackhole, NO_PROXY="",
               FSSEG_CONF=str(REPO / "conf"), WANDB_DIR=str(tmp_path))  # fmt: skip
    run_dir = tmp_path / "run"
    over = tiny_overrides(synth_root, tmp_path / "cache", logger="wandb", callbacks="with_panels",
                          **{"+sweep_name": "demo-table9", "data.fold": 1, "seed": 3, "callbacks.panels.limit": 2})  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "fsseg-train"), *over, f"hydra.run.dir={run_dir}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert elapsed < 90, f"took {elapsed:.0f} s: wandb waited for the network"
    assert (run_dir / "metrics.json").is_file() and (run_dir / "qualitative" / "test_panels.png").is_file()
    rec = _offline_records(run_dir)  # what `wandb sync <run dir>/wandb/offline-run-*` would upload
    assert rec["group"] == "demo-table9"
    assert set(rec["tags"]) == {"pfenet", "fold1", "1shot", "seed3"}
    assert json.loads(rec["config"]["run_dir"]) == str(run_dir) and json.loads(rec["config"]["data"])["fold"] == 1
    assert json.loads(rec["config"]["sweep_name"]) == "demo-table9"
    assert "test/qualitative/_type" in rec["history"], "the prediction panel was not logged to wandb"
    assert "test/miou" in rec["history"]


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No wandb settings from the machine: no mode, no key, an empty netrc, the default host."""
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(k, raising=False)
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("")
    monkeypatch.setenv("NETRC", str(netrc_file))
    return netrc_file


def test_no_key_means_offline(wandb_env):
    from fsseg.cli.common import environment_defaults

    assert environment_defaults() == "offline" and os.environ["WANDB_MODE"] == "offline"


@pytest.mark.parametrize("mode", ["disabled", "offline", "online"])
def test_an_explicit_mode_is_kept(wandb_env, monkeypatch, mode):
    from fsseg.cli.common import environment_defaults

    monkeypatch.setenv("WANDB_MODE", mode)
    assert environment_defaults(probe_timeout=0.1) == mode and os.environ["WANDB_MODE"] == mode


def test_key_and_reachable_host_means_online(wandb_env, monkeypatch):
    """A key (here from `wandb login`'s netrc entry) and a host that accepts connections: WANDB_MODE stays unset."""
    import socket

    from fsseg.cli.common import environment_defaults, wandb_key_configured

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
        assert not wandb_key_configured("127.0.0.1")
        wandb_env.write_text(f"machine 127.0.0.1\n  login user\n  password {'x' * 40}\n")
        assert wandb_key_configured("127.0.0.1")
        assert environment_defaults(probe_timeout=2.0) == "online"
        assert "WANDB_MODE" not in os.environ
    finally:
        server.close()


def test_key_but_no_network_goes_offline_fast(wandb_env, monkeypatch):
    from fsseg.cli.common import environment_defaults

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed port: unreachable
    start = time.monotonic()
    assert environment_defaults(probe_timeout=2.0) == "offline"
    assert os.environ["WANDB_MODE"] == "offline" and time.monotonic() - start < 10
