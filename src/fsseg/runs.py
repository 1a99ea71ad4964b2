"""A run directory knows whether it is finished: what fsseg-train, fsseg-sweep and fsseg-table agree on.

A run is *finished* when its directory holds ``metrics.json`` (written last), its recorded ``config.yaml``
equals the configuration it would run now (keys at their constructor default and where the run lives left
out), and its recorded code version equals this code's. fsseg-train checks that before training, so any
Hydra multirun of it is resumable: run the same command again and only missing runs execute::

    fsseg-train -m experiment=apanet_effl0_synth data.fold=0,1,2,3 aux.class_agnostic.n=1,2,3
    fsseg-train -m ... resume=auto      # the same, and half-done runs continue from their last.ckpt

A finished run of another config or code is moved to ``<parent>/_stale/<name>.<UTC time>`` and re-run. A run
that raises leaves ``<run dir>/FAILED`` (its error, then the traceback's end); wandb runs are always
finished (also on failure), so the jobs of one multirun never leak into each other.

The code version is the sha256 of the fsseg package's source files (every ``*.py`` under ``src/fsseg``):
what a run computes depends on them; unlike a git sha it also sees uncommitted edits, and it does not change
when only documentation, tests or sweep files do. The git sha is recorded beside it (provenance.json) and
named in rendered tables. Runs recorded before code versions were (no ``code_version`` in provenance.json)
are judged by their config alone. A researcher who knows that a code change does not touch what a run
computes (a report, a CLI, a comment) may vouch for the older version: ``FSSEG_ACCEPT_CODE=sha256:...[,...]``
(``fsseg-sweep --accept-code``) counts runs of those versions as finished; their provenance keeps the version
they were made with, and tables name every git sha their runs came from.

It also holds what a run records at its start, when it may resume and which checkpoints it trusts:

- ``config.yaml`` (the resolved config) is written when a run starts, before any training; ``resume=auto``
  compares it with the config of the new invocation and refuses a different one, naming the keys
  (where the run lives, its logger and ``resume`` itself are not compared).
- A checkpoint is trusted only if it loads and every floating tensor of its state dict is finite; an unreadable
  ``last.ckpt`` is moved aside and the run resumes from ``best.ckpt`` or from scratch (one line says which).
- Paths recorded in results are relative to the run directory, so a copied or moved run stays usable.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from fsseg.errors import ConfigError, RunError

__all__ = [
    "ACCEPT_CODE_ENV",
    "FAILED_FILE",
    "accepted_code_versions",
    "code_version",
    "config_diff",
    "config_digest",
    "guard_run",
    "package_digest",
    "recorded_code_version",
    "recorded_config",
    "run_identity",
    "run_status",
    "set_aside",
    "skip_if_finished",
    "without_defaults",
]  # fmt: skip

FAILED_FILE = "FAILED"  # run_dir/FAILED: the error of the latest failed attempt
METRICS_FILE = "metrics.json"
PROVENANCE_FILE = "provenance.json"
STALE_DIR = "_stale"
ACCEPT_CODE_ENV = "FSSEG_ACCEPT_CODE"  # comma-separated code versions vouched for as this one


# --------------------------------------------------------------------------- code version
def package_digest(package_dir: str | os.PathLike | None = None) -> str:
    """``sha256:<16 hex>`` over the relative paths and bytes of every ``*.py`` under the package directory."""
    root = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """The code version of this process's fsseg package (recorded in provenance.json as ``code_version``)."""
    return package_digest()


# --------------------------------------------------------------------------- recorded state
def recorded_config(run_dir: str | os.PathLike) -> dict | None:
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return None
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _provenance(run_dir: str | os.PathLike) -> dict:
    try:
        data = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_code_version(run_dir: str | os.PathLike) -> str | None:
    """The code version a run was made with; None for runs recorded before code versions were."""
    return _provenance(run_dir).get("code_version")


def recorded_git_sha(run_dir: str | os.PathLike) -> str | None:
    sha = (_provenance(run_dir).get("git") or {}).get("sha")
    return None if sha in (None, "unknown") else str(sha)


# --------------------------------------------------------------------------- comparing configs
_VOLATILE = ("run_dir",)  # where the run lives is not part of what it computes
# nor are resuming (a resumed run equals an uninterrupted one, tested) and tags (labels for the dashboard)
_NOT_COMPARED = ("run_dir", "resume", "tags")
_NOT_COMPUTED = (*_NOT_COMPARED, "sweep_name", "logger")  # ... which table it serves, how it is logged


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


@functools.cache
def _constructor_defaults(target: str) -> dict[str, Any]:
    """Keyword defaults of the callable a ``_target_`` names ({} when it cannot be imported or inspected)."""
    import inspect

    try:
        from hydra.utils import get_object

        sig = inspect.signature(get_object(target))
    except Exception:  # noqa: BLE001 - an unknown target only means no key is treated as a default
        return {}
    return {n: _plain(q.default) for n, q in sig.parameters.items() if q.default is not inspect.Parameter.empty}


# classes that replaced another without changing what a run computes (same checkpoints, same CSV rows)
_EQUIVALENT_TARGETS = {
    "fsseg.callbacks.RunCheckpoint": "lightning.pytorch.callbacks.ModelCheckpoint",
    "fsseg.callbacks.RunCSVLogger": "lightning.pytorch.loggers.CSVLogger",
    "fsseg.trainer.make_trainer": "lightning.Trainer",  # its keyword defaults are the Trainer's (inference_mode=True...)
}
# top-level train.yaml options added after runs were recorded, at their default
_TOP_LEVEL_DEFAULTS = {"train": True, "ensemble": None, "prerequisites": "error", "init_from": None, "predictor": None}


def _same_path_spelling(value: Any) -> Any:
    """A relative or absolute path in its normal spelling ('./data/synth', 'data//synth/' -> 'data/synth'), so
    that FSSEG_DATA=data and the default ./data name one dataset; other values (URLs, hub names without
    dots or doubled slashes: unchanged by normpath) as they are."""
    if isinstance(value, str) and "/" in value and "://" not in value:
        return os.path.normpath(value)
    if isinstance(value, (list, tuple)):
        return [_same_path_spelling(x) for x in value]
    if isinstance(value, Mapping):
        return {k: _same_path_spelling(x) for k, x in value.items()}
    return value


def without_defaults(node: Any, top: bool = True) -> Any:
    """The config with every key dropped whose value equals its ``_target_``'s constructor default, so that a
    config that spells a default out and one that leaves it to the constructor compare equal: adding an option
    with its default to conf/ leaves finished runs finished. Paths are compared in their normal spelling
    (:func:`_same_path_spelling`)."""
    if isinstance(node, str):
        return _same_path_spelling(node)
    if isinstance(node, Mapping):
        out = {k: without_defaults(v, top=False) for k, v in node.items()}
        if top:
            out = {k: v for k, v in out.items() if not (k in _TOP_LEVEL_DEFAULTS and v == _TOP_LEVEL_DEFAULTS[k])}
        target = node.get("_target_")
        if isinstance(target, str):
            out["_target_"] = _EQUIVALENT_TARGETS.get(target, target)
            for k, d in _constructor_defaults(target).items():
                if k in out and _plain(out[k]) == _same_path_spelling(d):
                    del out[k]
        return out
    if isinstance(node, (list, tuple)):
        return [without_defaults(x, top=False) for x in node]
    return node


def _without(cfg: Mapping, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in cfg.items() if k not in keys}


def config_digest(cfg: Mapping) -> str:
    body = without_defaults(_without(cfg, _VOLATILE))
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def same_config(recorded: Mapping, expected: Mapping) -> bool:
    """Equal but for keys not compared, options at their defaults and where each run lives: paths inside a run's
    own directory (its checkpoints) compare relative to it, so a copied, moved or restored run stays finished."""
    return computed_config(recorded, _NOT_COMPARED) == computed_config(expected, _NOT_COMPARED)


def computed_config(cfg: Mapping, not_computed: tuple[str, ...] = _NOT_COMPUTED) -> dict:
    """What a run computes, wherever it lives: its config without ``not_computed`` and without options at their
    defaults, its own directory replaced by a placeholder (fsseg-train compares it when resuming)."""
    own = _same_path_spelling(str(cfg.get("run_dir") or "\0"))  # as without_defaults spells the values

    def norm(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace(own, "<run_dir>")
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    return norm(without_defaults(_without(cfg, tuple(not_computed))))


def run_identity(cfg: Mapping) -> str:
    """Digest of `computed_config`. Runs are deterministic, so two runs with one identity (and one code version)
    give the same metrics (fsseg-sweep re-uses a finished run of another table instead of training)."""
    body = computed_config(cfg)
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for messages)."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        if prefix == "" and k in _NOT_COMPARED:
            continue
        ka = f"{prefix}{k}"
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, ka + ".")
        elif va != vb:
            out.append(f"{ka}: {va!r} -> {vb!r}")
    return out


def accepted_code_versions() -> frozenset[str]:
    """The code versions ``FSSEG_ACCEPT_CODE`` vouches for as equivalent to this one (empty when unset)."""
    raw = os.environ.get(ACCEPT_CODE_ENV, "")
    versions = frozenset(v.strip() for v in raw.split(",") if v.strip())
    bad = sorted(v for v in versions if not re.fullmatch(r"sha256:[0-9a-f]{16}", v))
    if bad:
        raise ConfigError(f"{ACCEPT_CODE_ENV}={raw!r}: {bad} are not code versions; expected sha256:<16 hex digits>, "
                          "as provenance.json records under code_version")  # fmt: skip
    return versions


def code_matches(run_dir: str | os.PathLike) -> bool:
    """The run was made with this code (or recorded before code versions were, or with a version vouched for in
    ``FSSEG_ACCEPT_CODE``)."""
    rec = recorded_code_version(run_dir)
    return rec is None or rec == code_version() or rec in accepted_code_versions()


def run_status(run_dir: str | os.PathLike, expected: Mapping | None = None) -> str:
    """``finished`` (metrics.json; with ``expected``: the same config and code version), ``stale`` (finished
    with another config or code), ``failed`` (FAILED marker, no metrics.json), ``started`` (a directory without
    either) or ``missing``."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        if expected is None:
            return "finished"
        rec = recorded_config(run_dir)
        same = rec is not None and same_config(rec, expected) and code_matches(run_dir)
        return "finished" if same else "stale"
    if (run_dir / FAILED_FILE).is_file():
        return "failed"
    return "started" if run_dir.is_dir() else "missing"


def why_stale(run_dir: str | os.PathLike, expected: Mapping) -> str:
    """What differs between a finished run and the run asked for: config keys, else the code version."""
    # as same_config compares: paths inside each run's own directory relative to it
    diff = config_diff(computed_config(recorded_config(run_dir) or {}, _NOT_COMPARED),
                       computed_config(dict(expected), _NOT_COMPARED))  # fmt: skip
    if diff:
        return "config changed (" + "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "") + ")"
    return f"code changed ({recorded_code_version(run_dir)} -> {code_version()})"


# --------------------------------------------------------------------------- fsseg-train's side
def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def set_aside(run_dir: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path | None:
    """Move a run directory to ``<parent>/_stale/<name>.<UTC time>`` (or ``dest``): neither resumed nor lost."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    dest = Path(dest) if dest is not None else run_dir.parent / STALE_DIR / f"{run_dir.name}.{_utc()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(dest))
    return dest


def expected_config(cfg: Any, run_dir: Path) -> dict:
    """The resolved config fsseg-train records in ``run_dir/config.yaml`` for ``cfg`` (a DictConfig)."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))


def skip_if_finished(cfg: Any, run_dir: Path, log=print) -> bool:
    """True (and says so) when ``run_dir`` is finished with this config and code; a finished run of another
    config or code is set aside (the caller then runs it again)."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return False
    expected = expected_config(cfg, run_dir)
    if run_status(run_dir, expected) == "finished":
        log(f"fsseg-train: {run_dir} is finished (same config and code); nothing to do")
        return True
    reason = why_stale(run_dir, expected)
    dest = set_aside(run_dir)
    log(f"fsseg-train: {run_dir} finished with another config or code: {reason}; moved to {dest}, running again")
    return False


def _write_failed(run_dir: Path, text: str) -> None:
    from fsseg.io import write_text_atomic

    write_text_atomic(Path(run_dir) / FAILED_FILE, text.rstrip() + "\n")


def _finish_wandb(exit_code: int) -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


@contextlib.contextmanager
def guard_run(run_dir: Path) -> Iterator[None]:
    """Around one run: a FAILED marker of an earlier attempt is removed; an exception (or a SystemExit with a
    message) writes ``FAILED`` (error line, traceback's end) and propagates; wandb is finished in every case."""
    run_dir = Path(run_dir)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
    code = 1
    try:
        yield
        code = 0
    except KeyboardInterrupt:
        raise  # interrupted, not failed: the next attempt resumes
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            code = 0
            raise
        error = str(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).splitlines()
        _write_failed(run_dir, f"error: {error.splitlines()[0] if error else type(exc).__name__}\n"
                               f"--- traceback (last 30 lines) ---\n" + "\n".join(tb[-30:]))  # fmt: skip
        raise
    finally:
        _finish_wandb(code)


# ---------------------------------------------------------------------------- start, resume, checkpoints
CONFIG_FILE = "config.yaml"
# not compared on resume: where the run lives, how it is logged, which table it serves, the resume request
_NOT_COMPARED_ON_RESUME = ("run_dir", "sweep_name", "logger", "resume")


def check_learning_rates(cfg: Mapping) -> None:
    """Every learning rate of ``optim`` finite and > 0, named by option (NaN, inf, 0 and negatives refused)."""
    optim = cfg.get("optim") or {}
    pairs = [(f"optim.{k}", optim.get(k)) for k in ("base_lr", "lr_multiplier")]
    for i, group in enumerate(optim.get("param_groups") or []):
        pairs += [(f"optim.param_groups[{i}].{k}", group.get(k)) for k in ("base_lr", "lr_multiplier") if k in group]
    for name, value in pairs:
        try:
            ok = value is not None and math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{name}={value!r}: expected a finite number > 0")


def limited_training(limit_train_batches: Any = None, fast_dev_run: Any = False) -> bool:
    """A smoke budget: Lightning's fast_dev_run, or limit_train_batches as a batch count (int) or a fraction < 1."""
    if fast_dev_run:
        return True
    lim = limit_train_batches
    if isinstance(lim, bool) or not isinstance(lim, (int, float)):  # None, or not a number (Lightning refuses it)
        return False
    return isinstance(lim, int) or lim < 1.0


def check_training_steps(cfg: Mapping) -> None:
    """A training run must train: zero epochs, steps or batches are refused unless ``train=false`` asks for
    evaluation only."""
    if not cfg.get("train", True):
        return
    trainer = cfg.get("trainer") or {}
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and value == 0:
            raise ConfigError(
                f"trainer.{key}={value}: the run would train nothing and record an untrained model as finished; "
                "expected >= 1 (for evaluation only, set train=false, or run fsseg-eval on a trained run directory)"
            )
    episodes = (cfg.get("data") or {}).get("train_episodes_per_epoch")
    if episodes is not None and int(episodes) == 0:
        raise ConfigError("data.train_episodes_per_epoch=0: the run would train nothing; expected >= 1 or null")


# ------------------------------------------------------------------------------------------------ checkpoints
def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load(weights_only=True) on CPU; a corrupt or foreign file is a RunError naming it."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"checkpoint {path} is unreadable ({type(err).__name__}: {str(err).split('. ')[0][:120]})") from err
    if not isinstance(ckpt, dict):
        raise RunError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    return ckpt


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating tensors of a state dict that hold NaN or +-inf."""
    import torch

    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def check_finite_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``; a RunError if it is unreadable or any weight is non-finite."""
    ckpt = load_checkpoint(path)
    bad = non_finite_tensors(ckpt.get("state_dict", ckpt))
    if bad:
        raise RunError(
            f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {', '.join(bad[:3])}); "
            "no metrics are written from it (lower optim.base_lr, or resume from an earlier checkpoint)"
        )
    return ckpt


def relative_to_run(path: str | os.PathLike | None, run_dir: Path) -> str | None:
    """``path`` relative to the run directory when it lies inside it (results stay valid when the run moves)."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(run_dir.resolve()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------------ resume
def record_config(run_dir: Path, config_yaml: str) -> None:
    from fsseg.io import write_text_atomic

    write_text_atomic(run_dir / CONFIG_FILE, config_yaml)


def check_same_config(run_dir: Path, current: Mapping, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` when the config recorded in ``run_dir`` differs from ``current``."""
    recorded = recorded_config(run_dir)
    if recorded is None:
        return  # a run of an fsseg that recorded its config at the end: nothing to compare with
    a = computed_config(recorded, _NOT_COMPARED_ON_RESUME)
    b = computed_config(current, _NOT_COMPARED_ON_RESUME)
    diff = config_diff(a, b)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise RunError(
            f"resume=auto: {run_dir / CONFIG_FILE} was recorded with another config than this one ({shown}); "
            f"{checkpoint.name} would continue the old weights under the new values. Use a new run directory, "
            "or repeat the recorded values"
        )


def resume_checkpoint(cfg: Mapping, run_dir: Path, say: Callable[[str], None] = print) -> str | None:
    """The checkpoint ``cfg.resume`` asks for. ``auto``: this run directory's last.ckpt if any; an unreadable
    or non-finite one is moved aside and best.ckpt (if good) or nothing (from scratch) is used instead."""
    resume = cfg.get("resume")
    if resume in (None, ""):
        return None
    if resume != "auto":
        if not Path(resume).is_file():
            raise ConfigError(f"resume={resume}: no such checkpoint file (expected a .ckpt path or 'auto')")
        return str(resume)
    folder = run_dir / "checkpoints"
    last = folder / "last.ckpt"
    if not last.is_file():
        return None
    try:
        check_finite_checkpoint(last)
        return str(last)
    except RunError as err:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        aside = folder / f"last.corrupt-{stamp}.ckpt"
        os.replace(last, aside)
        best = folder / "best.ckpt"
        fallback = None
        if best.is_file():
            try:
                check_finite_checkpoint(best)
                fallback = best
            except RunError:
                pass
        then = f"resuming from {fallback.name}" if fallback else "starting from scratch"
        say(f"{err}; moved to {aside.name}, {then}")
        return str(fallback) if fallback else None
