"""fsseg-record: keep finished runs in the repository without their checkpoints, and bring them back.

    fsseg-record save outputs/sweeps results/sweeps       # make record
    fsseg-record restore results/sweeps outputs/sweeps    # make restore

A sweep of 4 folds x 3 seeds on 2 CPU cores outlives a working session, and the machine it ran on may not come
back. ``save`` copies what a table, fsseg-bias or the bias study reads from every *finished* run (metrics.json,
config.yaml, provenance.json, the sweep's spec, fsseg-bias's evaluations, manifests) into a record tree of the
same layout, leaving out checkpoints, loggers' folders, logs, images and any file over ``--max-kib``; each
recorded run gets ``RECORD.json`` naming what was left out. ``restore`` copies records back into an output
root, where they are finished runs again: fsseg-sweep skips them (when their code version is this one's or is
accepted: ``--accept-code``), fsseg-table and the bias study read them, and fsseg-bias re-uses their
evaluations. Anything that needs the weights (a new fsseg-bias evaluation, fsseg-eval, resuming) says that the
run is a record and has none.

Only finished runs are recorded (``metrics.json``, written last); a run directory that started but did not
finish, failed, or was set aside (``_stale``) is not. A record whose run finished again differently (another
metrics.json) is replaced as a whole, never merged. ``restore`` never overwrites a finished run; an unfinished
one in its place is set aside first.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.errors import ConfigError

RECORD_FILE = "RECORD.json"
METRICS = "metrics.json"
SKIP_DIRS = frozenset({"checkpoints", "wandb", "lightning_logs", "tensorboard", "_stale", "__pycache__", "qualitative"})
SKIP_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".safetensors", ".npy", ".npz", ".log", ".png", ".jpg", ".tmp"})
SKIP_NAMES = frozenset({"hydra.yaml", "hparams.yaml"})  # Hydra's own settings; the CSV logger's copy of config.yaml
MAX_KIB = 512


RUN_MARKERS = ("config.yaml", "provenance.json", "sweep.json", ".hydra", "FAILED")


def is_run_dir(d: Path) -> bool:
    """A training run's directory, finished or not: fsseg-sweep writes sweep.json when it launches it, Hydra its
    .hydra folder, fsseg-train config.yaml and provenance.json at its start, FAILED when it raises."""
    return any((d / name).exists() for name in RUN_MARKERS)


def is_record(run_dir: str | os.PathLike) -> bool:
    return (Path(run_dir) / RECORD_FILE).is_file()


def _kept(path: Path, max_bytes: int) -> str | None:
    """None when the file belongs in a record, else why not."""
    if path.suffix in SKIP_SUFFIXES or path.name in SKIP_NAMES:
        return f"{path.suffix} file" if path.suffix in SKIP_SUFFIXES else "a copy"
    size = path.stat().st_size
    return f"{size} bytes > {max_bytes}" if size > max_bytes else None


def _files(root: Path, max_bytes: int, prune_runs: bool = False) -> tuple[list[Path], list[dict]]:
    """Files of ``root`` (relative) that a record keeps, and those it leaves out (path, why), not entering
    skipped folders (nor, with ``prune_runs``, run directories: the files outside every run)."""
    keep, left = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for name in sorted(dirnames):
            if name in SKIP_DIRS or (prune_runs and is_run_dir(d / name)):
                dirnames.remove(name)
                if name in SKIP_DIRS:
                    left.append({"path": (d / name).relative_to(root).as_posix() + "/", "why": "not recorded"})
        for name in sorted(filenames):
            p = d / name
            why = _kept(p, max_bytes) if p.is_file() and not p.is_symlink() else "not a plain file"
            (left.append({"path": p.relative_to(root).as_posix(), "why": why}) if why else keep.append(p.relative_to(root)))
    return keep, left


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _copy_if_changed(src: Path, dst: Path) -> bool:
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def _runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (not under skipped folders), outermost first."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if n not in SKIP_DIRS)
        if is_run_dir(d):
            found.append(d)
            dirnames[:] = []  # a run's own subfolders (fsseg-bias evaluations) belong to its record
    return found


def save(src_root: str | os.PathLike, dst_root: str | os.PathLike, max_kib: int = MAX_KIB) -> dict[str, int]:
    """Record every finished run under ``src_root`` into ``dst_root`` (same relative paths); files outside run
    directories (pick.json, tables' .md/.csv) too. Returns counts: recorded, unchanged, unfinished, files."""
    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise ConfigError(f"fsseg-record save: {src_root} is not a folder (expected an output root such as outputs/sweeps)")
    max_bytes = max_kib * 1024
    counts = {"recorded": 0, "unchanged": 0, "unfinished": 0, "files": 0}
    runs = _runs(src_root)
    for run in runs:
        rel = run.relative_to(src_root)
        dst = dst_root / rel
        if not (run / METRICS).is_file():
            counts["unfinished"] += 1
            continue
        if (dst / METRICS).is_file() and not filecmp.cmp(run / METRICS, dst / METRICS, shallow=False):
            shutil.rmtree(dst)  # the run finished again, differently: its old record goes as a whole
        keep, left = _files(run, max_bytes)
        changed = sum(_copy_if_changed(run / f, dst / f) for f in keep if f.as_posix() != METRICS)
        record = {"run": rel.as_posix(), "left_out": left, "files": {f.as_posix(): _sha(run / f) for f in keep}}
        old = json.loads((dst / RECORD_FILE).read_text()) if (dst / RECORD_FILE).is_file() else None
        if old != record:
            (dst / RECORD_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        changed += _copy_if_changed(run / METRICS, dst / METRICS)  # last, like fsseg-train writes it
        counts["recorded" if changed else "unchanged"] += 1
        counts["files"] += len(keep) + 1
    keep, _ = _files(src_root, max_bytes, prune_runs=True)  # outside every run: pick.json, tables, bias summaries
    for f in keep:
        _copy_if_changed(src_root / f, dst_root / f)
        counts["files"] += 1
    return counts


def restore(src_root: str | os.PathLike, dst_root: str | os.PathLike) -> dict[str, int]:
    """Copy the records under ``src_root`` into ``dst_root`` as finished runs; a finished run already there is
    kept, an unfinished one set aside first. Returns counts: restored, kept, set_aside, and runs per code version."""
    from fsseg.runs import recorded_code_version, set_aside

    src_root, dst_root = Path(src_root), Path(dst_root)
    if not src_root.is_dir():
        raise ConfigError(f"fsseg-record restore: {src_root} is not a folder (expected a record tree such as results/sweeps)")
    counts = {"restored": 0, "kept": 0, "set_aside": 0}
    records = [d for d in _runs(src_root) if is_record(d)]
    for rec in records:
        version = recorded_code_version(rec) or "unrecorded"
        counts[version] = counts.get(version, 0) + 1
        dst = dst_root / rec.relative_to(src_root)
        if (dst / METRICS).is_file():
            counts["kept"] += 1
            continue
        if dst.exists():
            set_aside(dst)
            counts["set_aside"] += 1
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(rec, dst, ignore=lambda d, names, top=rec: [METRICS] if Path(d) == top and METRICS in names else [])
        shutil.copyfile(rec / METRICS, dst / METRICS)  # last: a half-restored run never looks finished
        counts["restored"] += 1
    for dirpath, dirnames, filenames in os.walk(src_root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not is_run_dir(d / n)]
        for name in filenames:
            target = dst_root / (d / name).relative_to(src_root)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / name, target)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsseg-record", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="record the finished runs of an output root")
    s.add_argument("src", help="output root (e.g. outputs/sweeps)")
    s.add_argument("dst", help="record tree (e.g. results/sweeps)")
    s.add_argument("--max-kib", type=int, default=MAX_KIB, help="largest file a record keeps (KiB)")
    r = sub.add_parser("restore", help="copy records back into an output root as finished runs")
    r.add_argument("src", help="record tree (e.g. results/sweeps)")
    r.add_argument("dst", help="output root (e.g. outputs/sweeps)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "save":
            if a.max_kib < 1:
                raise ConfigError(f"--max-kib must be >= 1, got {a.max_kib}")
            c = save(a.src, a.dst, a.max_kib)
            print(f"fsseg-record: {c['recorded']} run(s) recorded, {c['unchanged']} unchanged, "
                  f"{c['unfinished']} unfinished left out, {c['files']} files in {a.dst}")  # fmt: skip
        else:
            from fsseg.runs import code_version

            c = restore(a.src, a.dst)
            print(f"fsseg-record: {c.pop('restored')} run(s) restored into {a.dst}, {c.pop('kept')} finished there "
                  f"kept, {c.pop('set_aside')} unfinished set aside")  # fmt: skip
            other = sorted(v for v in c if v not in (code_version(), "unrecorded"))
            for v in sorted(c):
                print(f"  {c[v]} record(s) made with code version {v}" + (" (this code)" if v == code_version() else ""))
            if other:
                print(f"  this code is {code_version()}: fsseg-sweep re-trains the others unless vouched for, "
                      f"after checking what changed since: FSSEG_ACCEPT_CODE={','.join(other)} (or --accept-code)")  # fmt: skip
        return 0
    except ConfigError as exc:
        print(f"fsseg-record: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
