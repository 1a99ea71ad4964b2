"""fsseg-sweep: run a paper table's sweep (sweeps/<paper>/<table>.yaml), resumably, then render the table.

    fsseg-sweep apanet-table4 --profile embedded          # embedded benchmark: fsseg-train -m, one job at a time
    fsseg-sweep apanet-table4                              # the paper's protocol (GPU), one device per job
    fsseg-sweep apanet-table4 --jobs 4                     # 4 jobs at once; with GPUs: one GPU each
    fsseg-sweep apanet-table4 --launcher slurm hydra.launcher.partition=gpu   # Hydra multirun + submitit
    fsseg-sweep apanet-table4 --launcher submitit_local    # the same path, as local processes (a check)
    fsseg-sweep apanet-table4 --dry-run                    # list runs, their status and directories
    fsseg-sweep --list                                     # every table, its methods and profiles

The sweep file becomes ``fsseg-train -m`` invocations (Hydra's basic launcher locally, hydra-submitit-launcher
on SLURM), then ``fsseg-table``. Every run gets ``<out>/<name>/<profile or paper>/<row slug>/<grid slug>``. A
run whose ``metrics.json`` exists and whose recorded ``config.yaml`` and code version equal what this sweep
would run is skipped (fsseg.runs), so running the command again resumes an interrupted sweep; a finished run
with another config or code is moved to
``<out>/<name>/<profile>/_stale/`` and re-run. A failing run leaves ``<run dir>/FAILED`` (the error and the
end of its log) and the others go on. The command ends with a summary (done / skipped / failed) and renders
the table (``fsseg-table``); it exits 1 if any run failed.

Extra arguments ``key=value`` are Hydra overrides applied to every run (after the table's own; they are part
of each run's config, so they count for "finished"). Arguments starting with ``hydra.launcher.`` configure
the multirun launcher (slurm / submitit_local) only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsseg.cli.common import config_dir, environment_defaults
from fsseg.errors import ConfigError
from fsseg.runs import ACCEPT_CODE_ENV, accepted_code_versions, code_version, recorded_code_version, why_stale
from fsseg.sweeps import (
    FAILED_FILE,
    SPEC_FILE,
    Run,
    Sweep,
    compose_run_configs,
    config_digest,
    find_sweep,
    finished_runs,
    format_value,
    list_sweeps,
    load_sweep,
    merge_overrides,
    missing_methods,
    override_key,
    run_identity,
    run_status,
    slugify,
    sweep_name_of,
    sweeps_dir,
)

LAUNCHERS = ("local", "submitit_local", "slurm")
_TAIL = 40


def _utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")


def train_command() -> list[str]:
    """fsseg-train of this interpreter's environment."""
    exe = Path(sys.executable).parent / "fsseg-train"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "fsseg.cli.train"]


def _tail(path: Path, n: int = _TAIL) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _error_line(log_text: str) -> str:
    """The most telling line of a failed run's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln or ln.startswith("fsseg-")) and not ln.startswith(("File ", "raise ")):
            return ln
    return lines[-1] if lines else "no output"


@dataclass
class Planned:
    run: Run
    overrides: list[str]
    expected: dict | None = None
    status: str = "pending"          # pending | skipped | reused | done | failed | interrupted
    message: str = ""
    source: Path | None = None       # reused: the finished run (of another table) that did this computation
    seconds: float = 0.0


@dataclass
class Outcome:
    planned: list[Planned] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(p.status == status for p in self.planned)


# --------------------------------------------------------------------------- planning
def plan(sweep: Sweep, profile: str | None, out: Path, extra: Sequence[str], conf: str, apply: bool = True,
         reuse: bool = True, reuse_from: Sequence[str | os.PathLike] = ()) -> list[Planned]:  # fmt: skip
    """Expand the sweep and decide, run by run, what to do; with ``apply``, run directories of another config
    (stale results, partial runs) are moved to <out>/<name>/<profile>/_stale/ so they are neither resumed nor lost.
    With ``reuse``, a run to do whose ``run_identity`` equals a finished run of another table under ``out`` (or
    under one of the ``reuse_from`` output roots) is marked "reused" (its files are copied, not re-trained: runs are
    deterministic)."""
    grid_keys = set(sweep.effective_grid(profile))
    clash = [o for o in extra if override_key(o) in grid_keys]
    if clash:
        raise ConfigError(f"override(s) {clash} set grid key(s) of {sweep.path}; edit the grid (or a profile) instead")
    runs = [r for r in sweep.expand(profile, out) if not r.shared]  # a shared run serves several rows: run it once
    items = [(merge_overrides(run.overrides, extra, ["resume=auto"]), run.run_dir) for run in runs]
    configs = compose_run_configs(items, conf)
    planned = []
    for run, (overrides, _), expected in zip(runs, items, configs):
        p = Planned(run=run, overrides=overrides)
        if isinstance(expected, Exception):  # a bad override fails this run only
            p.status, p.message = "failed", f"config: {type(expected).__name__}: {expected}"
            planned.append(p)
            continue
        p.expected = expected
        status = run_status(run.run_dir, p.expected)
        if status == "finished":
            made_with = recorded_code_version(run.run_dir)
            code = "code" if made_with in (None, code_version()) else f"code version {made_with} (accepted)"
            p.status, p.message = "skipped", f"finished earlier with the same config and {code}"
        elif status == "stale":
            p.message = "re-run: " + why_stale(run.run_dir, p.expected)
            if apply:
                _set_aside(run, out)
        elif status in ("started", "failed"):
            spec = _read_spec(run.run_dir)
            if spec.get("config_sha256") != config_digest(p.expected):
                p.message = "re-run from scratch: an unfinished run of another config is set aside"
                if apply:
                    _set_aside(run, out)  # its checkpoints must not be resumed
            elif status == "failed":
                p.message = "failed earlier: retried"
            else:
                p.message = "unfinished earlier: resumes from its last.ckpt if any"
        planned.append(p)
    pending = [p for p in planned if p.status == "pending"]
    if reuse and pending:
        done: dict[str, Path] = {}
        for root in (out, *reuse_from):
            for identity, run_dir in finished_runs(root).items():
                done.setdefault(identity, run_dir)
        for p in pending:
            src = done.get(run_identity(p.expected))
            if src is not None and src.resolve() != p.run.run_dir.resolve():
                p.status, p.source, p.message = "reused", src, f"same computation as the finished run {src}"
    return planned


def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (checkpoints cost no space and survive the source being set aside), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _reuse(p: Planned, out: Path) -> None:
    """Copy a finished run of another table into this run's directory (files hard-linked where possible): the
    recorded config becomes this run's (identical but for its directory and sweep name), metrics.json comes last."""
    import yaml

    from fsseg.provenance import _write_text_atomic

    src = p.source
    dst = p.run.run_dir
    _set_aside(p.run, out)

    def later(folder: str, names: list[str]) -> set[str]:  # the run's own metrics.json and spec, not its subfolders'
        return {"metrics.json", SPEC_FILE} & set(names) if Path(folder) == Path(src) else set()

    shutil.copytree(src, dst, symlinks=True, ignore=later, copy_function=_link_or_copy)
    _write_text_atomic(dst / "config.yaml", yaml.safe_dump(p.expected, sort_keys=False))
    _write_spec(p, [], "reuse", reused_from=str(src))
    tmp = dst / "metrics.json.tmp"
    shutil.copyfile(src / "metrics.json", tmp)
    os.replace(tmp, dst / "metrics.json")


def _read_spec(run_dir: Path) -> dict:
    import json

    try:
        return json.loads((run_dir / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _set_aside(run: Run, out: Path) -> None:
    if not run.run_dir.exists():
        return
    dest = Path(out) / run.sweep / run.profile / "_stale" / run.row.slug / f"{run.grid_slug}.{_utc()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run.run_dir), str(dest))


def _write_spec(p: Planned, command: Sequence[str], launcher: str, **extra: Any) -> None:
    from fsseg.provenance import write_json_atomic

    run = p.run
    run.run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run.run_dir / SPEC_FILE,
        {
            "sweep": run.sweep, "profile": run.profile, "row": run.row.label,
            "column": run.column.label if run.column else None, "point": dict(run.point),
            "overrides": p.overrides, "command": list(command), "launcher": launcher,
            "config_sha256": config_digest(p.expected or {}), "started_utc": _utc(), **extra,
        },
    )  # fmt: skip


def _write_failed(run_dir: Path, message: str) -> None:
    from fsseg.provenance import _write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(run_dir / FAILED_FILE, message.rstrip() + "\n")


# --------------------------------------------------------------------------- local launcher
def terminate(procs: Sequence[subprocess.Popen], grace: float = 30.0) -> None:
    """SIGTERM every live process (Lightning saves and exits), SIGKILL those still alive after ``grace`` s."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()


# --------------------------------------------------------------------------- launching: Hydra multirun
class MultirunLauncher:
    """Every path is Hydra multirun: runs become ``fsseg-train -m`` invocations whose grid values are Hydra
    sweep values, into ``hydra.sweep.dir=<root>/<row>`` + ``hydra.sweep.subdir=<grid slug>``.

    - ``basic`` (the local default): Hydra's basic launcher, one job at a time. One multirun per row and seed
      (the rest of its grid swept), seeds outermost, so an interrupted sweep has compared every row on the same
      seeds. With ``jobs`` > 1, ``jobs`` single-run multiruns at once, one device each (CUDA_VISIBLE_DEVICES).
    - ``slurm`` / ``submitit_local``: hydra-submitit-launcher, one multirun per row (its whole grid one job
      array); rows are launched concurrently (each process waits for its jobs); a timed-out SLURM job is
      requeued and resumes from its last.ckpt (every run has ``resume=auto``).
    fsseg-train skips a run that is already finished, marks a failing one (FAILED) and finishes wandb itself."""

    def __init__(self, launcher: str = "basic", launcher_overrides: Sequence[str] = (), jobs: int = 1,
                 gpus: Sequence[str] | None = None, max_parallel_rows: int = 16):  # fmt: skip
        self.launcher = launcher
        self.launcher_overrides = list(launcher_overrides)
        self.local = launcher == "basic"
        self.jobs = max(1, int(jobs))
        self.gpus = (list(gpus) if gpus is not None else _visible_gpus()) if self.local else []
        if self.gpus and self.jobs > len(self.gpus):
            raise ConfigError(f"--jobs {self.jobs} but only {len(self.gpus)} GPU(s) ({self.gpus}): one device per job")
        self.slots = self.jobs if self.local else max_parallel_rows
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self._free: list[int] = list(range(self.slots))
        self._stopping = False

    @staticmethod
    def _check_slug_values(todo: list[Planned]) -> None:
        for p in todo:
            for k, v in p.run.point.items():
                if slugify(v) != str(v):
                    raise ConfigError(
                        f"grid value {k}={v!r} is not usable in a Hydra sweep subdir; the multirun launchers need "
                        "plain grid values (numbers, names)"
                    )

    def batches(self, todo: list[Planned]) -> list[list[Planned]]:
        """The runs of each ``fsseg-train -m``: a unit (row, column group; local: and seed) when all its points
        are to run, else one run each; local with several jobs: one run each (one device per job)."""
        if self.local and self.jobs > 1:
            return [[p] for p in todo]
        units: dict[tuple, list[Planned]] = defaultdict(list)
        for p in todo:
            units[(p.run.unit, p.run.seed if self.local else None)].append(p)
        out = []
        for plist in units.values():
            keys = list(plist[0].run.point)
            full = 1
            for k in keys:
                full *= len(dict.fromkeys(repr(p.run.point[k]) for p in plist))
            out += [plist] if full == len(plist) else [[p] for p in plist]
        return out

    def command(self, batch: list[Planned]) -> list[str]:
        run0 = batch[0].run
        keys = list(run0.point)
        vals = {k: list(dict.fromkeys(p.run.point[k] for p in batch)) for k in keys}
        fixed = [o for o in batch[0].overrides if override_key(o) not in keys]
        sweep_args = [f"{k}={','.join(format_value(v) for v in vs)}" for k, vs in vals.items()]
        subdir = "_".join(f"{k}-${{{k}}}" for k in keys) if keys else "default"
        return [
            *train_command(), "-m", *fixed, *sweep_args, f"hydra/launcher={self.launcher}",
            f"hydra.sweep.dir={format_value(str(run0.run_dir.parent.resolve()))}", f"hydra.sweep.subdir={subdir}",
            *self.launcher_overrides,
        ]  # fmt: skip

    def commands(self, todo: list[Planned]) -> list[tuple[list[Planned], list[str], Path]]:
        """[(runs, command, log path)] in launch order."""
        self._check_slug_values(todo)
        out = []
        for batch in self.batches(todo):
            run0 = batch[0].run
            name = run0.grid_slug if len(batch) == 1 else slugify(run0.unit.replace("/", "_"))
            out.append((batch, self.command(batch), run0.run_dir.parent / f"multirun-{name}-{_utc()}.log"))
        return out

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("FSSEG_CONF", config_dir())
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        if self.local and self.jobs > 1:  # share the CPU cores between the concurrent jobs
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
        return env

    def _run_batch(self, batch: list[Planned], index: str) -> None:
        with self._lock:
            slot = self._free.pop(0)
        try:
            self._launch_batch(batch, index, slot)
        finally:
            with self._lock:
                self._free.append(slot)

    def _launch_batch(self, batch: list[Planned], index: str, slot: int) -> None:
        run0 = batch[0].run
        cmd = self.command(batch)
        name = run0.grid_slug if len(batch) == 1 else slugify(run0.unit.replace("/", "_"))
        log_path = run0.run_dir.parent / f"multirun-{name}-{_utc()}.log"
        for p in batch:
            (p.run.run_dir / FAILED_FILE).unlink(missing_ok=True)
            _write_spec(p, cmd, self.launcher)
        where = f" (GPU {self.gpus[slot]})" if self.gpus else ""
        what = run0.describe() if len(batch) == 1 else f"'{run0.row.label}': {len(batch)} runs"
        print(f"{index} {what}{where}: fsseg-train -m, hydra/launcher={self.launcher} (log: {log_path})", flush=True)
        start = time.monotonic()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"=== {_utc()} {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(slot))
            with self._lock:
                self._procs.add(proc)
            rc = proc.wait()  # interrupted: the process stays registered, so stop() ends it
            with self._lock:
                self._procs.discard(proc)
        seconds = time.monotonic() - start
        tail = _tail(log_path)
        for p in batch:
            p.seconds = seconds
            run_dir = p.run.run_dir
            if (run_dir / "metrics.json").is_file():
                p.status, p.message = "done", _metric_summary(run_dir)
                print(f"{index} {p.run.describe()}: done{p.message}", flush=True)
                continue
            if self._stopping and (rc < 0 or rc in (130, 143)):
                p.status, p.message = "interrupted", f"stopped by signal ({rc})"
                continue
            p.status = "failed"
            own = _read_failed(run_dir)  # fsseg-train's own record of the error (fsseg.runs.guard_run)
            job_logs = sorted((run_dir.parent / ".submitit").glob("*/*_log.err"))
            p.message = own or _error_line(tail)
            header = "" if own else f"error: {p.message}\n"
            _write_failed(run_dir, f"multirun exit code {rc}\ncommand: {' '.join(cmd)}\n{header}"
                                   f"{(run_dir / FAILED_FILE).read_text() if own else ''}"
                                   f"submitit logs: {', '.join(map(str, job_logs[-4:])) or 'none'}\n"
                                   f"--- last {_TAIL} lines of {log_path} ---\n{tail}")  # fmt: skip
            print(f"{index} {p.run.describe()}: FAILED: {p.message} (see {run_dir / FAILED_FILE})", flush=True)

    def stop(self) -> None:
        self._stopping = True
        with self._lock:
            procs = list(self._procs)
        terminate(procs)

    def launch(self, todo: list[Planned]) -> None:
        self._check_slug_values(todo)
        batches = self.batches(todo)
        if not batches:
            return
        n = len(batches)
        with ThreadPoolExecutor(max_workers=min(self.slots, n)) as pool:
            futures = [pool.submit(self._run_batch, b, f"[{i}/{n}]") for i, b in enumerate(batches, 1)]
            try:
                for f in futures:
                    while not f.done():
                        time.sleep(0.2)
                    f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                self.stop()  # end the running children now: leaving the pool waits for their threads
                raise


def LocalLauncher(jobs: int = 1, gpus: Sequence[str] | None = None) -> MultirunLauncher:
    """The local path: Hydra's basic launcher, ``jobs`` multiruns at once, one device each."""
    return MultirunLauncher("basic", jobs=jobs, gpus=gpus)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        return []


def _read_failed(run_dir: Path) -> str:
    try:
        text = (run_dir / FAILED_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return next((ln[len("error: "):] for ln in text.splitlines() if ln.startswith("error: ")), "")


def _metric_summary(run_dir: Path) -> str:
    from fsseg.provenance import read_metrics

    try:
        rec = read_metrics(run_dir) or {}
        m = rec.get("metrics") or {}
        return f" (mIoU {100 * m['miou']:.2f}, FB-IoU {100 * m['fbiou']:.2f})"
    except Exception:  # noqa: BLE001
        return ""


# --------------------------------------------------------------------------- main
def run_sweep(
    sweep: Sweep,
    profile: str | None = None,
    out: str | os.PathLike = "outputs/sweeps",
    extra: Sequence[str] = (),
    launcher: str = "local",
    jobs: int = 1,
    launcher_overrides: Sequence[str] = (),
    dry_run: bool = False,
    render: bool = True,
    reuse: bool = True,
    reuse_from: Sequence[str | os.PathLike] = (),
) -> Outcome:
    """Plan, launch and summarise; the table is rendered at the end (also after failures)."""
    out = Path(out)
    conf = config_dir()
    missing = missing_methods(sweep, conf)
    if missing:
        raise ConfigError(
            f"{sweep.name} ({sweep.path}) needs method(s) not implemented yet: {', '.join(missing)} "
            f"(no {', '.join(f'conf/method/{m}.yaml' for m in missing)})"
        )
    planned = plan(sweep, profile, out, list(extra), conf, apply=not dry_run, reuse=reuse, reuse_from=reuse_from)
    outcome = Outcome(planned)
    todo = [p for p in planned if p.status == "pending"]
    prof = planned[0].run.profile if planned else (profile or "paper")
    print(f"{sweep.name} [{prof}]: {len(planned)} runs, {len(todo)} to run, "
          f"{outcome.count('skipped')} finished earlier, {outcome.count('reused')} re-used from other tables, "
          f"{outcome.count('failed')} failed to compose", flush=True)  # fmt: skip
    for p in planned:
        if p.status == "failed":
            if not dry_run:
                _write_failed(p.run.run_dir, p.message)
            print(f"  {p.run.describe()}: FAILED before launch: {p.message}", flush=True)
        elif p.message and p.status in ("pending", "reused"):
            print(f"  {p.run.describe()}: {p.message}", flush=True)
            if p.status == "reused" and not dry_run:
                _reuse(p, out)
    if dry_run:
        for p in planned:
            print(f"  {p.status:8s} {p.run.describe():40s} {p.run.run_dir}")
            if p.status == "pending":
                print(f"           {' '.join(p.overrides)}")
        return outcome
    if launcher == "local":
        runner = LocalLauncher(jobs)
        todo = breadth_first(todo, sweep.effective_grid(profile))
    else:
        runner = MultirunLauncher(launcher, launcher_overrides)

    def _sigterm(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _sigterm) if threading.current_thread() is threading.main_thread() else None
    interrupted = False
    start = time.monotonic()
    try:
        runner.launch(todo)
    except KeyboardInterrupt:
        interrupted = True
        runner.stop()
        for p in todo:
            if p.status == "pending" or (p.status == "failed" and not (p.run.run_dir / "metrics.json").exists()
                                         and "signal" in p.message):  # fmt: skip
                p.status = "interrupted"
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    elapsed = time.monotonic() - start
    _summary(sweep, prof, outcome, elapsed)
    if render:
        from fsseg.cli.table import render as render_table

        try:
            paths = render_table(sweep, profile, out)
            print("table: " + ", ".join(str(p) for p in paths.values()), flush=True)
        except Exception as exc:  # noqa: BLE001 - the runs are what matter; say why the table is missing
            print(f"could not render the table: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if interrupted:
        raise KeyboardInterrupt
    return outcome


def breadth_first(todo: list[Planned], grid: dict[str, list]) -> list[Planned]:
    """Launch order of the local launcher: seeds outermost, then the other grid values, then the rows, so that an
    interrupted (or still running) sweep has compared every row on the same seeds and folds."""
    keys = sorted(grid, key=lambda k: k != "seed")  # seed first, then the grid's order

    def position(p: Planned) -> tuple:
        point = p.run.point
        return tuple(grid[k].index(point[k]) if point.get(k) in grid[k] else len(grid[k]) for k in keys)

    return sorted(todo, key=position)  # stable: rows keep the table's order within a grid point


def _summary(sweep: Sweep, prof: str, outcome: Outcome, elapsed: float) -> None:
    c = outcome.count
    line = (f"{sweep.name} [{prof}] summary: {c('done')} done, {c('skipped')} skipped (finished earlier), "
            f"{c('reused')} re-used from other tables, {c('failed')} failed")  # fmt: skip
    if c("interrupted") or c("pending"):
        line += f", {c('interrupted') + c('pending')} not run (interrupted)"
    print(f"{line}; {elapsed:.0f} s", flush=True)
    for p in outcome.planned:
        if p.status == "failed":
            print(f"  FAILED {p.run.describe()}: {p.message}\n         {p.run.run_dir / FAILED_FILE}", flush=True)


def list_tables(out=None) -> int:
    out = out if out is not None else sys.stdout  # resolved at call time (pytest's capsys swaps sys.stdout)
    conf = config_dir()
    d = sweeps_dir()
    rows = []
    for f in list_sweeps(d):
        name = sweep_name_of(f, d)
        try:
            s = load_sweep(f)
        except ConfigError as exc:
            rows.append((name, "INVALID", str(exc), ""))
            continue
        miss = missing_methods(s, conf)
        state = "ready" if not miss else "needs " + ",".join(miss)
        profiles = ",".join(s.profile_names()) or "-"
        rows.append((name, state, s.title, profiles))
    print(f"{'target':36s} {'methods':18s} {'profiles':10s} title", file=out)
    for name, state, title, profiles in rows:
        print(f"reproduce-{name:26s} {state:18s} {profiles:10s} {title}", file=out)
    print("run: make reproduce-<paper>-<table> [PROFILE=embedded]", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    environment_defaults()
    ap = argparse.ArgumentParser(prog="fsseg-sweep", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("sweep", nargs="?", help="sweep name (apanet-table4) or file (sweeps/apanet/table4.yaml)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run; hydra.launcher.* for the launcher")
    ap.add_argument("--profile", default="", help="a profile of the sweep file (e.g. embedded); empty = the paper's protocol")
    ap.add_argument("--out", default=os.environ.get("FSSEG_SWEEP_OUT", "outputs/sweeps"), help="output root (default outputs/sweeps)")
    ap.add_argument("--launcher", choices=LAUNCHERS, default="local",
                    help="local: fsseg-train -m with Hydra's basic launcher; slurm / submitit_local: via hydra-submitit-launcher")
    ap.add_argument("--jobs", type=int, default=1, help="local launcher: multiruns at once, one run each and one GPU each")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    ap.add_argument("--no-table", action="store_true", help="do not render the table at the end")
    ap.add_argument("--no-reuse", action="store_true",
                    help="train every run, even one whose computation a finished run of another table already did")
    ap.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                    help="another output root whose finished runs may be re-used (repeatable; --out always is)")
    ap.add_argument("--accept-code", action="append", default=[], metavar="VERSION",
                    help="count finished runs made with this code version (sha256:..., as provenance.json records) as "
                         "finished: you vouch that the changes since do not alter what a run computes (repeatable; "
                         "sets FSSEG_ACCEPT_CODE for the runs)")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="list the sweep files (make list-tables)")
    args = ap.parse_intermixed_args(argv)  # options may come before or after the overrides
    if args.list:
        return list_tables()
    if not args.sweep:
        ap.error("name a sweep (see --list)")
    launcher_over = [o for o in args.overrides if o.startswith(("hydra.launcher.", "hydra/launcher"))]
    extra = [o for o in args.overrides if o not in launcher_over]
    if any(o.startswith("hydra") for o in extra):
        ap.error(f"fsseg-sweep sets hydra.* itself; only hydra.launcher.* may be given: {extra}")
    try:
        if args.accept_code:
            prior = os.environ.get(ACCEPT_CODE_ENV, "")
            os.environ[ACCEPT_CODE_ENV] = ",".join([v for v in prior.split(",") if v] + args.accept_code)
        accepted_code_versions()  # a malformed version is an error before any work
        sweep = load_sweep(find_sweep(args.sweep))
        outcome = run_sweep(sweep, args.profile or None, args.out, extra, args.launcher, args.jobs, launcher_over,
                            dry_run=args.dry_run, render=not args.no_table, reuse=not args.no_reuse,
                            reuse_from=args.reuse_from)  # fmt: skip
    except ConfigError as exc:
        print(f"fsseg-sweep: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fsseg-sweep: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if outcome.count("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
