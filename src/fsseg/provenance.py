"""Reproducibility record of a run directory.

A finished run directory holds::

    config.yaml       the resolved configuration, as given
    provenance.json   collect() + seeds + episode manifest (hash, path, episodes)
    metrics.json      the metrics, the manifest hash and episode count; written LAST and atomically

``metrics.json`` is the marker that a run finished: it is written with :func:`write_json_atomic` after
everything else, so a crash leaves either no ``metrics.json`` or a complete one, never a truncated file.
:func:`read_metrics` returns ``None`` for a run directory without it.

JSON conversion: tensors and numpy values become plain numbers/lists, paths become strings, and NaN and
+-inf (which JSON cannot represent) are written as ``null``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _metadata
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fsseg.errors import DataError
from fsseg.io import write_atomic, write_text_atomic

__all__ = ["collect", "read_metrics", "to_jsonable", "write_json_atomic", "write_run_record"]

CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
SCHEMA_VERSION = 1

# Key in the record -> distribution name for importlib.metadata.
_PACKAGES = {
    "fsseg": "fsseg",
    "torch": "torch",
    "lightning": "lightning",
    "timm": "timm",
    "torchmetrics": "torchmetrics",
    "albumentations": "albumentations",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "numpy": "numpy",
}


# ------------------------------------------------------------------ collect
# Set by git hooks and some tools; they would point git at another repository than repo_dir.
_GIT_LOCATION_VARS = frozenset(
    {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR", "GIT_NAMESPACE",
     "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_PREFIX"}
)  # fmt: skip

def _git(repo_dir: Path, *args: str) -> str | None:
    """Output of ``git -C repo_dir args`` or None on any failure (no git, not a checkout, timeout...)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    env["GIT_OPTIONAL_LOCKS"] = "0"  # `git status` must not take the index lock of a running checkout
    try:
        out = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip()


def _git_info(repo_dir: Path) -> dict[str, Any]:
    sha = _git(repo_dir, "rev-parse", "--verify", "HEAD")
    if not sha:
        return {"sha": "unknown", "dirty": None}
    status = _git(repo_dir, "status", "--porcelain")
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _version(dist: str) -> str | None:
    try:
        return _metadata.version(dist)
    except Exception:  # noqa: BLE001 - PackageNotFoundError, or a broken distribution's metadata
        return None


def _cuda_info() -> dict[str, Any]:
    info: dict[str, Any] = {"available": False, "device_count": 0, "device_name": None, "cuda_version": None}
    try:
        import torch

        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            info["available"] = True
            info["device_count"] = torch.cuda.device_count()
            info["device_name"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop a run from recording itself
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def _threads() -> dict[str, Any]:
    """CPU results depend on the intra-op thread count (reductions split differently: a conv's gradient differs in
    the last bits between 1 and 2 threads), so a bit-identical CPU re-run needs the same count: recorded."""
    info: dict[str, Any] = {"torch": None, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    try:
        import torch

        info["torch"] = torch.get_num_threads()
    except Exception as exc:  # noqa: BLE001 - recording must never stop a run
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


def collect(extra: dict | None = None, repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Describe the code, environment and invocation of the current process. Never raises.

    Keys: ``git`` ({"sha", "dirty"}; sha "unknown" and dirty null outside a git checkout; dirty counts
    modified tracked files and untracked files that are not ignored), ``code_version`` (the digest of the
    fsseg package's source, :func:`fsseg.runs.code_version`), ``python``, ``platform``,
    ``hostname``, ``versions`` (fsseg, torch, lightning, timm, torchmetrics, albumentations, hydra,
    omegaconf, numpy; null when not installed), ``cuda`` ({"available", "device_count", "device_name",
    "cuda_version"}), ``threads`` ({"torch": intra-op threads, "OMP_NUM_THREADS"}: CPU results are
    bit-identical only at the same count), ``argv``, ``executable``, ``cwd``, ``timestamp_utc`` (ISO 8601).

    Args:
        extra: merged into the record at the top level (its keys win on a clash).
        repo_dir: where to look for the git checkout; default: the directory of the fsseg package, i.e.
            the checkout the running code comes from.
    """
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        host = socket.gethostname()
    except OSError:
        host = None
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = None
    from fsseg.runs import code_version

    record: dict[str, Any] = {
        "git": _git_info(repo),
        "code_version": code_version(),  # what fsseg-train compares to call a run finished (fsseg.runs)
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "hostname": host,
        "versions": {key: _version(dist) for key, dist in _PACKAGES.items()},
        "cuda": _cuda_info(),
        "threads": _threads(),
        "argv": list(sys.argv),
        "executable": sys.executable,
        "cwd": cwd,
        "timestamp_utc": _utc_now(),
    }
    if extra:
        record.update(extra)
    return record


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------- JSON
def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, paths, tuples and non-finite floats to plain JSON values.

    Objects of other types are returned unchanged (``json.dump`` then raises ``TypeError`` on them).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): to_jsonable(v)
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [to_jsonable(v) for v in items]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            return to_jsonable(obj.item())
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file in the same directory + ``os.replace``).

    ``obj`` goes through :func:`to_jsonable` first. If serialisation fails (``TypeError`` for an
    unserialisable object), the exception propagates, no temp file remains and ``path`` is untouched.
    """
    data = to_jsonable(obj)

    def write(f: Any) -> None:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")

    buf = io.StringIO()
    write(buf)
    write_atomic(path, buf.getvalue())


_write_text_atomic = write_text_atomic  # the name the table/sweep/bias CLIs import


# --------------------------------------------------------------- run record
def write_run_record(
    run_dir: str | os.PathLike,
    config_yaml: str,
    seeds: dict,
    manifest: dict,
    metrics: dict,
) -> Path:
    """Write ``config.yaml``, ``provenance.json`` and finally ``metrics.json`` into ``run_dir``.

    Args:
        run_dir: the run directory (created if missing).
        config_yaml: the resolved configuration as YAML text, written verbatim.
        seeds: the seeds of the run (e.g. ``{"seed": 0, "episode_seed": 321}``).
        manifest: the episode manifest: ``{"hash": str, "path": str, "episodes": int}``.
        metrics: the results (e.g. :meth:`FewShotIoU.compute`'s dict); tensors/numpy become plain values.

    ``metrics.json`` holds ``{"schema", "metrics", "manifest_hash", "episodes", "finished_utc"}``. An
    existing ``metrics.json`` is removed *first*, so a crash while rewriting a run directory cannot leave
    an old "finished" marker next to new provenance. Returns the path of ``metrics.json``.
    """
    missing = [k for k in ("hash", "path", "episodes") if k not in manifest]
    if missing:
        raise ValueError(f"write_run_record: manifest lacks key(s) {missing}; got keys {sorted(manifest)}")
    if not isinstance(config_yaml, str):
        raise ValueError(  # noqa: TRY004 - documented as ValueError, like the missing-keys check
            f"write_run_record: config_yaml must be YAML text (str), got {type(config_yaml).__name__}"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)

    episodes = to_jsonable(manifest["episodes"])
    metric_episodes = to_jsonable(metrics.get("episodes")) if isinstance(metrics, Mapping) else None
    if metric_episodes is not None and episodes is not None and metric_episodes != episodes:
        warnings.warn(
            f"write_run_record: metrics were computed on {metric_episodes} episodes but the manifest "
            f"{manifest['path']} lists {episodes}",
            stacklevel=2,
        )

    write_atomic(run_dir / CONFIG_FILE, config_yaml)
    write_json_atomic(run_dir / PROVENANCE_FILE, collect(extra={"seeds": seeds, "manifest": manifest}))
    write_json_atomic(
        metrics_path,
        {
            "schema": SCHEMA_VERSION,
            "metrics": metrics,
            "manifest_hash": manifest["hash"],
            "episodes": episodes,
            "finished_utc": _utc_now(),
        },
    )
    return metrics_path


def read_metrics(run_dir: str | os.PathLike) -> dict | None:
    """The content of ``run_dir/metrics.json``, or None if the run has not finished (no such file).

    Raises :class:`fsseg.errors.DataError` (a ValueError) naming the file if it is not valid JSON.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
