"""fsseg-table: render a sweep's run directories as the paper's table, ours beside the paper's numbers.

    fsseg-table apanet-table4 --profile embedded    # -> outputs/sweeps/apanet-table4/embedded/table.{md,csv,png}
    fsseg-table sweeps/apanet/table4.yaml           # the paper's protocol (profile "paper")
    fsseg-table --all                               # every sweep that has run directories (make tables)

Layout: one line per row of the sweep file, per column (e.g. Fold-0..3) our value, the paper's and the
difference (ours - paper), then the Mean column. Ours = mean ± 95% CI over the seeds of the cell
(fsseg.metrics.aggregate_seeds, Student t; one seed: no interval). Values are percentages (metrics x 100).
Failed runs are marked FAILED (their error is listed below the table), runs not yet finished "…".
Below the table: each row's paired difference against the first row (or the rows ``paired:`` names) over the
grid points both finished.
Below the table: the evaluation-manifest hash and episode count of every column (and a warning if two rows
of one column were evaluated on different episodes), and the git sha(s) the finished runs' code came from. Files written next to the runs:

    table.md    Markdown (the table, manifests, failures)
    table.csv   the table, wide: row, then per column: ours, ci95, n, paper, diff, status
    runs.csv    one line per run: directory, status, metrics, manifest hash, episodes, error
    table.png   line plot of ours vs the paper over the swept value (sweep files with `plot:`)
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsseg.errors import ConfigError
from fsseg.runs import recorded_git_sha
from fsseg.sweeps import FAILED_FILE, MEAN, Row, Run, Sweep, find_sweep, list_sweeps, load_sweep

__all__ = ["build_table", "collect", "main", "render"]

METRIC_NAMES = {"miou": "mIoU", "fbiou": "FB-IoU", "fp_rate": "FP rate", "fn_rate": "FN rate"}


@dataclass
class RunResult:
    run: Run
    status: str                 # finished | failed | started | missing
    metrics: dict[str, Any]
    manifest_hash: str | None
    episodes: int | None
    error: str = ""
    git_sha: str | None = None  # the commit the run's code came from (provenance.json)


def collect(sweep: Sweep, profile: str | None, out: str | os.PathLike) -> list[RunResult]:
    """Read every expected run directory of the sweep (metrics.json, FAILED)."""
    from fsseg.provenance import read_metrics

    results = []
    for run in sweep.expand(profile, out):
        d = run.run_dir
        rec = None
        try:
            rec = read_metrics(d)
        except ValueError as exc:  # unreadable metrics.json: report, do not crash the table
            results.append(RunResult(run, "failed", {}, None, None, str(exc)))
            continue
        if rec is not None:
            results.append(RunResult(run, "finished", dict(rec.get("metrics") or {}), rec.get("manifest_hash"),
                                     rec.get("episodes"), git_sha=recorded_git_sha(d)))  # fmt: skip
        elif (d / FAILED_FILE).is_file():
            text = (d / FAILED_FILE).read_text(encoding="utf-8", errors="replace")
            err = next((ln[len("error: "):] for ln in text.splitlines() if ln.startswith("error: ")), None)
            results.append(RunResult(run, "failed", {}, None, None, err or text.strip().splitlines()[0]))
        else:
            results.append(RunResult(run, "started" if d.is_dir() else "missing", {}, None, None))
    return results


# --------------------------------------------------------------------------- cells
@dataclass
class Cell:
    mean: float | None = None
    ci95: float | None = None
    std: float | None = None
    n: int = 0
    failed: int = 0
    pending: int = 0
    paper: float | None = None
    per_seed: dict | None = None
    pct: bool = True            # a percentage: one decimal
    derived: bool = False       # the Mean column: computed from the other cells

    @property
    def diff(self) -> float | None:
        return None if self.mean is None or self.paper is None else self.mean - self.paper

    @property
    def status(self) -> str:
        if self.failed and not self.n:
            return "failed"
        if self.n and (self.failed or self.pending):
            return "partial"
        return "ok" if self.n else "pending"

    def text(self) -> str:
        if self.status == "failed":
            return "— (incomplete)" if self.derived else "FAILED"
        if self.mean is None:
            return "…"
        s = _num(self.mean, pct=self.pct)
        if self.ci95 is not None and math.isfinite(self.ci95):
            s += f" ± {_num(self.ci95, pct=self.pct)}"
        if self.failed:
            s += f" ({self.failed} failed)"
        elif self.pending:
            s += f" ({self.pending} pending)"
        return s


# Metrics that metrics.json stores as fractions and papers print in %: multiplied by 100. Others (FP/FN rates,
# cross entropies, parameter counts...) are shown as logged, like the papers that print them.
PERCENT_METRICS = ("miou", "fbiou", "mask_ratio")


def scale_of(metric: str) -> float:
    return 100.0 if metric.startswith(PERCENT_METRICS) else 1.0


def _value(r: RunResult, metric: str) -> float | None:
    v = r.metrics.get(metric + r.run.row.metric_suffix)  # a row with `metric_suffix` reads e.g. miou_meta
    if v is None or isinstance(v, (list, dict, str, bool)):
        return None
    return scale_of(metric) * float(v)


def _aggregate(per_seed: dict[Any, float], failed: int, pending: int, paper: float | None) -> Cell:
    from fsseg.metrics import aggregate_seeds

    cell = Cell(failed=failed, pending=pending, paper=paper, per_seed=per_seed)
    if per_seed:
        agg = aggregate_seeds(list(per_seed.values()))
        cell.mean, cell.std, cell.n = agg["mean"], agg["std"], agg["n"]
        cell.ci95 = agg["ci95"] if math.isfinite(agg["ci95"]) else None
    return cell


def _per_seed(rs: list[RunResult], metric: str) -> tuple[dict, int, int]:
    """Seed -> value of the cell's finished runs (a finished run without the metric counts as pending)."""
    failed = sum(r.status == "failed" for r in rs)
    pending = sum(r.status in ("started", "missing") for r in rs)
    per_seed = {}
    for r in rs:
        v = _value(r, metric) if r.status == "finished" else None
        if v is not None:
            per_seed[r.run.seed] = v
        elif r.status == "finished":
            pending += 1
    return per_seed, failed, pending


def build_table(sweep: Sweep, profile: str | None, results: list[RunResult], metric: str) -> dict:
    """{row label: {column label: Cell}} plus the column list, for one table metric."""
    columns = sweep.columns(profile)
    show_mean = sweep.mean and sweep.all_columns_run(profile) and len(columns) > 0
    col_labels = [c.label for c in columns] or ["value"]
    table: dict[str, dict[str, Cell]] = {}
    first = sweep.metrics[0]
    for row in sweep.rows_run(profile):
        mine = [r for r in results if r.run.row.label == row.label]
        cells: dict[str, Cell] = {}
        seeds_by_col: dict[str, dict] = {}
        for label in col_labels:
            rs = [r for r in mine if (r.run.column.label if r.run.column else "value") == label]
            per_seed, failed, pending = _per_seed(rs, metric)
            cells[label] = _aggregate(per_seed, failed, pending, row.paper_value(metric, label, first))
            cells[label].pct = scale_of(metric) == 100.0
            seeds_by_col[label] = per_seed
        if show_mean:
            seeds = set.intersection(*(set(s) for s in seeds_by_col.values())) if seeds_by_col else set()
            per_seed = {s: sum(seeds_by_col[c][s] for c in col_labels) / len(col_labels) for s in sorted(seeds, key=repr)}
            incomplete = sum(cells[c].failed + cells[c].pending for c in col_labels)
            mean_cell = _aggregate(per_seed, 0, 0, row.paper_value(metric, MEAN, first))
            mean_cell.derived, mean_cell.pct = True, cells[col_labels[0]].pct
            if not per_seed and any(cells[c].failed for c in col_labels):
                mean_cell.failed = 1
            elif incomplete:
                mean_cell.pending = incomplete
            cells[MEAN] = mean_cell
        table[row.label] = cells
    return {"columns": col_labels + ([MEAN] if show_mean else []), "rows": table, "metric": metric,
            "show_mean": show_mean}


def paired_differences(sweep: Sweep, profile: str | None, results: list[RunResult], metric: str) -> list[dict]:
    """Per pair of ``sweep.pairs`` (default: each row against the first): the row's ``metric`` minus its
    baseline's at every grid point (fold, seed, ...) where both finished; mean ± 95% CI over those points, their
    number and how many the row wins. Pairing removes what the points share (the fold's episodes; with the same
    seed, initialisation and episode order where the rows' parameters agree), so it separates rows that the
    per-cell intervals cannot."""
    from fsseg.metrics import aggregate_seeds

    def values(row) -> dict:
        return {tuple(sorted((k, repr(v)) for k, v in r.run.point.items())): _value(r, metric)
                for r in results if r.run.row.label == row.label and r.status == "finished"}  # fmt: skip

    out = []
    for row, base in sweep.pairs(profile):
        ref = {k: v for k, v in values(base).items() if v is not None}
        d = [v - ref[k] for k, v in values(row).items() if v is not None and k in ref]
        if d:
            agg = aggregate_seeds(d)
            ci = agg["ci95"] if math.isfinite(agg["ci95"]) else None
            out.append({"row": row.label, "baseline": base.label, "mean": agg["mean"], "ci95": ci, "n": len(d),
                        "wins": sum(x > 0 for x in d)})  # fmt: skip
    return out


def _metrics_to_render(sweep: Sweep) -> list[str]:
    """One table per metric of ``metrics:``."""
    return list(sweep.metrics)


# --------------------------------------------------------------------------- writers
def _num(v: float, signed: bool = False, pct: bool = True) -> str:
    """1 decimal for percentages and other values >= 10, more digits for small values (rates, entropies)."""
    sign = "+" if signed else ""
    a = abs(v)
    if pct or a >= 10 or a == 0:
        return f"{v:{sign}.1f}"
    if a >= 1:
        return f"{v:{sign}.2f}"
    return f"{v:{sign}.4f}"


def _fmt(v: float | None, signed: bool = False, pct: bool = True) -> str:
    return "—" if v is None else _num(v, signed, pct)


def _manifests(sweep: Sweep, profile: str | None, results: list[RunResult]) -> list[str]:
    """One line per grid point (fold, shots, seed...): the manifest hash(es) and episode count(s) of its runs;
    every row of one point should have been evaluated on the same episodes."""
    lines = []
    points: dict[tuple, set] = {}
    for r in results:
        if r.status == "finished" and not r.run.shared:
            key = tuple((k, v) for k, v in r.run.point.items())
            points.setdefault(key, set()).add((r.manifest_hash, r.episodes))
    order = {k: {repr(v): i for i, v in enumerate(vals)} for k, vals in sweep.effective_grid(profile).items()}
    for key, pairs in sorted(points.items(), key=lambda kv: [order.get(k, {}).get(repr(v), 0) for k, v in kv[0]]):
        what = "; ".join(f"`{(h or 'unknown')[:16]}` ({e} episodes)" for h, e in sorted(pairs, key=repr))
        warn = " **⚠ rows were evaluated on different episodes**" if len(pairs) > 1 else ""
        where = ", ".join(f"{k}={v}" for k, v in key) or "all runs"
        lines.append(f"- {where}: {what}{warn}")
    return lines


def _paired_section(sweep: Sweep, profile: str | None, results: list[RunResult], metric: str, first: bool) -> list[str]:
    """Markdown lines of the paired differences in ``metric`` (none when no pair has two points). The first metric
    says which row is "ahead" (higher is better for it); later ones (error rates, bias measures) only say which
    row is higher."""
    pairs = paired_differences(sweep, profile, results, metric)
    if not pairs or max(p["n"] for p in pairs) <= 1:
        return []
    name = METRIC_NAMES.get(metric, metric)
    pct = scale_of(metric) == 100.0
    wins = "row ahead" if first else "row higher"
    bases = {p["baseline"] for p in pairs}
    what = (f"{name} of the row minus that row's at each grid point where both finished; mean ± 95% CI over the "
            "points (Student t).")  # fmt: skip
    if len(bases) == 1:
        out = [f"Paired differences{'' if first else f' in {name}'} against {next(iter(bases))}: {what}", "",
               f"| row | Δ | points | {wins} |", "|---|---:|---:|---:|"]  # fmt: skip
    else:
        out = [f"Paired differences{'' if first else f' in {name}'}: {what.replace('that row', 'its baseline')}", "",
               f"| row | baseline | Δ | points | {wins} |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for p in pairs:
        ci = "" if p["ci95"] is None else f" ± {_num(p['ci95'], pct=pct)}"
        base = "" if len(bases) == 1 else f" {p['baseline']} |"
        out.append(f"| {p['row']} |{base} {_num(p['mean'], signed=True, pct=pct)}{ci} | {p['n']} | {p['wins']} of {p['n']} |")
    return [*out, ""]


def markdown(sweep: Sweep, profile: str | None, results: list[RunResult], tables: list[dict]) -> str:
    prof = results[0].run.profile if results else (profile or "paper")
    grid = sweep.effective_grid(profile)
    out = [f"# {sweep.name}: {sweep.title}", "",
           f"Command: `fsseg-sweep {sweep.name}" + (f" --profile {prof}`" if prof != "paper" else "`")
           + f" (`make reproduce-{sweep.name}" + (f" PROFILE={prof}`)" if prof != "paper" else "`)") + ".", ""]
    src = f"Source: {sweep.source}. " if sweep.source else ""
    if prof == "paper":
        out.append(f"{src}Profile: the paper's protocol ({', '.join(sweep.base)}).")
    else:
        base = sweep.profile_base(prof) + list(sweep.profiles[prof].overrides)
        out.append(f"{src}Profile: **{prof}** ({', '.join(base)}) — a reduced budget on another dataset than the "
                   "paper's: compare trends (rows relative to each other), not absolute values.")  # fmt: skip
    seeds = grid.get("seed")
    out.append(f"Ours: mean ± 95% CI over seeds {seeds if seeds else '[default]'} (no interval with one seed); "
               "paper: as printed; Δ = ours − paper. mIoU/FB-IoU in %, other metrics as logged.")  # fmt: skip
    skipped = [r.label for r in sweep.rows if r not in sweep.rows_run(profile)]
    if skipped:
        out.append(f"Rows not run under this profile: {', '.join(skipped)}.")
    if sweep.mean and not tables[0]["show_mean"]:
        out.append(f"This profile runs only {', '.join(tables[0]['columns'])} of the paper's "
                   f"{', '.join(sweep.column_labels)}, so no Mean column is shown.")  # fmt: skip
    out.append("")
    first = sweep.plot.get("label") if sweep.plot else None
    for t in tables:
        if len(tables) > 1:
            out += [f"## {METRIC_NAMES.get(t['metric'], t['metric'])}", ""]
        head = [first or "row"]
        for c in t["columns"]:
            head += [c, f"{c} paper", "Δ"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for row in sweep.rows_run(profile):
            cells = t["rows"][row.label]
            line = [row.label]
            for c in t["columns"]:
                cell = cells[c]
                line += [cell.text(), _fmt(cell.paper, pct=cell.pct), _fmt(cell.diff, signed=True, pct=cell.pct)]
            out.append("| " + " | ".join(line) + " |")
        out.append("")
    for i, t in enumerate(tables):
        out += _paired_section(sweep, profile, results, t["metric"], first=i == 0)
    man = _manifests(sweep, profile, results)
    if man:
        out += ["Evaluation manifests (hash, episodes) per grid point:", *man, ""]
    shas: dict[str, int] = {}
    for r in results:
        if r.status == "finished" and not r.run.shared:
            shas[r.git_sha or "unknown"] = shas.get(r.git_sha or "unknown", 0) + 1
    if shas:
        out += ["Code: " + ", ".join(f"git `{sha[:12]}` ({n} run{'s' * (n != 1)})" for sha, n in
                                     sorted(shas.items(), key=lambda kv: -kv[1])) + ".", ""]  # fmt: skip
    own = [r for r in results if not r.run.shared]  # a run shared by several rows counts once
    failed = [r for r in own if r.status == "failed"]
    counts = {s: sum(r.status == s for r in own) for s in ("finished", "failed", "started", "missing")}
    shared = len(results) - len(own)
    out.append(f"Runs: {counts['finished']} finished, {counts['failed']} failed, "
               f"{counts['started'] + counts['missing']} not finished, of {len(own)}"
               + (f" (+{shared} read again by a row sharing them)." if shared else "."))  # fmt: skip
    if failed:
        out += ["", "Failed runs:"]
        for r in failed:
            out.append(f"- {r.run.describe()}: {r.error} (`{r.run.run_dir / FAILED_FILE}`)")
    return "\n".join(out) + "\n"


def table_csv(sweep: Sweep, tables: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = tables[0]["columns"]
    header = ["metric", "row"]
    for c in cols:
        header += [c, f"{c} ci95", f"{c} n", f"{c} paper", f"{c} diff", f"{c} status"]
    w.writerow(header)

    def num(v):
        return "" if v is None else f"{v:.4f}"

    for t in tables:
        for row in sweep.rows_run():
            if row.label not in t["rows"]:
                continue
            line = [t["metric"], row.label]
            for c in cols:
                cell = t["rows"][row.label][c]
                line += [num(cell.mean), num(cell.ci95), cell.n, num(cell.paper), num(cell.diff), cell.status]
            w.writerow(line)
    return buf.getvalue()


def runs_csv(sweep: Sweep, results: list[RunResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    # The four headline metrics first, then every other scalar any finished run records (e.g. BAM-based methods'
    # meta-learner-alone `miou_meta` / `fp_rate_meta`); a run without one leaves its cell empty.
    metric_keys = ["miou", "fbiou", "fp_rate", "fn_rate"]
    metric_keys += sorted({k for r in results for k, v in r.metrics.items() if k not in metric_keys
                           and isinstance(v, (int, float)) and not isinstance(v, bool)})  # fmt: skip
    w.writerow(["row", "column", *results[0].run.point.keys(), "status", *metric_keys, "manifest_hash",
                "episodes", "run_dir", "error", "git_sha"] if results else ["row"])  # fmt: skip
    for r in results:
        vals = [r.metrics.get(k, "") for k in metric_keys]
        w.writerow([r.run.row.label, r.run.column.label if r.run.column else "", *r.run.point.values(), r.status,
                    *vals, r.manifest_hash or "", r.episodes if r.episodes is not None else "", r.run.run_dir,
                    r.error, r.git_sha or ""])  # fmt: skip
    return buf.getvalue()


def _x_of_row(sweep: Sweep, row: Row, results: list[RunResult]) -> Any:
    """The plotted value of a row: its override of plot.x, else the recorded config's value."""
    from fsseg.sweeps import override_key

    key = sweep.plot["x"]
    for o in reversed(row.overrides):
        if override_key(o) == key:
            import yaml

            return yaml.safe_load(o.split("=", 1)[1])
    from fsseg.sweeps import recorded_config

    for r in results:
        if r.run.row.label == row.label:
            cfg = recorded_config(r.run.run_dir)
            if cfg:
                node: Any = cfg
                for part in key.split("."):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is not None:
                    return node
    return None


def plot(sweep: Sweep, profile: str | None, results: list[RunResult], t: dict, path: Path) -> Path | None:
    """Ours vs the paper over the swept value (plot.x); the Mean column if shown, else every column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep.rows_run(profile)
    xs_raw = [_x_of_row(sweep, row, results) for row in rows]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_raw)
    xs = xs_raw if numeric else list(range(len(rows)))
    series = [MEAN] if t["show_mean"] else [c for c in t["columns"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    prof = results[0].run.profile if results else "paper"
    # Another dataset/budget than the paper's: the paper's numbers on their own (right) axis - compare trends.
    pax = ax if prof == "paper" else ax.twinx()
    for i, label in enumerate(series):
        colour = colours[i % len(colours)]
        cells = [t["rows"][row.label][label] for row in rows]
        ours = [(x, c.mean, c.ci95 or 0.0) for x, c in zip(xs, cells) if c.mean is not None]
        if ours:
            ax.errorbar([o[0] for o in ours], [o[1] for o in ours], yerr=[o[2] for o in ours], color=colour,
                        marker="o", capsize=3, label=f"ours ({prof}) {label}")  # fmt: skip
        failed = [(x) for x, c in zip(xs, cells) if c.status == "failed"]
        if failed:
            ax.scatter(failed, [ax.get_ylim()[0]] * len(failed), marker="x", color="red", zorder=5,
                       label="failed run" if i == 0 else None)  # fmt: skip
        paper = [(x, c.paper) for x, c in zip(xs, cells) if c.paper is not None]
        if paper:
            pax.plot([p[0] for p in paper], [p[1] for p in paper], color=colour, linestyle="--", marker="s",
                     alpha=0.7, label=f"paper {label}" + ("" if pax is ax else " (right axis)"))  # fmt: skip
    if not numeric:
        ax.set_xticks(xs, [row.label for row in rows], rotation=20, ha="right")
    elif sweep.plot.get("logx"):
        ax.set_xscale("log")
    ax.set_xlabel(sweep.plot.get("label") or sweep.plot["x"])
    name = METRIC_NAMES.get(t["metric"], t["metric"]) + (" (%)" if scale_of(t["metric"]) == 100.0 else "")
    ax.set_ylabel(f"ours: {name}" if pax is not ax else name)
    if pax is not ax:
        pax.set_ylabel(f"paper: {name}")
    ax.set_title(f"{sweep.name} [{prof}]", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if pax is not ax:
        h2, l2 = pax.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(sweep: Sweep, profile: str | None = None, out: str | os.PathLike = "outputs/sweeps",
           dest: str | os.PathLike | None = None) -> dict[str, Path]:  # fmt: skip
    """Write table.md, table.csv, runs.csv (and table.png for sweeps with `plot:`); returns their paths."""
    from fsseg.provenance import _write_text_atomic

    results = collect(sweep, profile, out)
    tables = [build_table(sweep, profile, results, m) for m in _metrics_to_render(sweep)]
    root = Path(dest) if dest else sweep.root(profile, out)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"md": root / "table.md", "csv": root / "table.csv", "runs": root / "runs.csv"}
    _write_text_atomic(paths["md"], markdown(sweep, profile, results, tables))
    _write_text_atomic(paths["csv"], table_csv(sweep, tables))
    _write_text_atomic(paths["runs"], runs_csv(sweep, results))
    if sweep.plot:
        paths["png"] = plot(sweep, profile, results, tables[0], root / "table.png")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsseg-table", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("sweep", nargs="?", help="sweep name (apanet-table4) or file")
    ap.add_argument("--profile", default="", help="profile (e.g. embedded); empty = the paper's protocol")
    ap.add_argument("--out", default=os.environ.get("FSSEG_SWEEP_OUT", "outputs/sweeps"), help="sweep output root")
    ap.add_argument("--all", action="store_true", help="render every sweep/profile that has run directories")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown")
    args = ap.parse_args(argv)
    try:
        if args.all:
            done = 0
            for f in list_sweeps():
                try:
                    s = load_sweep(f)
                except ConfigError as exc:
                    print(f"fsseg-table: skipping {f}: {exc}", file=sys.stderr)
                    continue
                for prof in [None, *s.profile_names()]:
                    if s.root(prof, args.out).is_dir():
                        paths = render(s, prof, args.out)
                        print(f"{s.name} [{prof or 'paper'}]: {paths['md']}")
                        done += 1
            if not done:
                print(f"fsseg-table: no sweep has run directories under {args.out}")
            return 0
        if not args.sweep:
            ap.error("name a sweep or use --all")
        sweep = load_sweep(find_sweep(args.sweep))
        paths = render(sweep, args.profile or None, args.out)
    except ConfigError as exc:
        print(f"fsseg-table: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
