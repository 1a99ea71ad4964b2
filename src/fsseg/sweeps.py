"""Paper-table sweep files: parsing, validation and expansion into runs (format: sweeps/FORMAT.md).

A sweep file ``sweeps/<paper>/<table>.yaml`` describes one table of a paper: Hydra overrides common to every
run (``base``), a grid multiplied into every row (``grid``: folds, seeds...), the rows (each with its
overrides and the paper's numbers) and how columns map to runs (``columns.by`` a grid key, or
``columns.groups`` with overrides of their own). ``profiles`` give small budgets of the same grid (e.g. the
embedded benchmark). This module turns that into a list of :class:`Run` with deterministic run directories::

    <out>/<name>/<profile or "paper">/<row slug>/<grid slug>

and knows whether a run is finished: ``metrics.json`` present AND the run's recorded ``config.yaml`` equals
the configuration the sweep would give it now (so a changed budget or override re-runs it).

    from fsseg.sweeps import load_sweep, find_sweep
    sweep = load_sweep(find_sweep("apanet-table4"))
    runs = sweep.expand(profile="embedded", out="outputs/sweeps")
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fsseg.errors import ConfigError
from fsseg.runs import (  # re-exported: the sweep machinery's view of a run directory
    FAILED_FILE,
    code_matches,
    config_diff,
    config_digest,
    recorded_config,
    run_identity,
    run_status,
    without_defaults,
)

__all__ = [
    "Sweep", "Row", "Column", "Run", "load_sweep", "find_sweep", "list_sweeps", "sweeps_dir", "slugify",
    "merge_overrides", "format_value", "compose_run_config", "compose_run_configs", "run_status", "missing_methods",
    "PAPER_PROFILE", "MEAN", "FAILED_FILE", "SPEC_FILE", "sweep_name_of", "override_key", "TASKS",
    "config_diff", "config_digest", "without_defaults", "run_identity", "recorded_config", "finished_runs",
    "code_matches",
]  # fmt: skip

PAPER_PROFILE = "paper"   # directory name of the paper's protocol (no profile)
MEAN = "Mean"             # the optional mean column's label
SPEC_FILE = "sweep.json"  # run_dir/sweep.json: what the sweep asked this run to be (written at launch)
SEED_KEY = "seed"
TASKS = ("train",)        # tasks fsseg-sweep runs (fsseg-train); others (e.g. `profile`) are refused by name

_NOTE = {"note", "notes"}
_TOP_KEYS = {
    "name", "paper", "source", "title", "dataset", "metric", "metrics", "methods", "budget", "base", "grid",
    "columns", "rows", "plot", "profiles", "reference", "task", "paired", *_NOTE,
}  # fmt: skip
_REQUIRED = ("name", "paper", "title", "methods", "base", "columns", "rows")
_ROW_KEYS = {"label", "overrides", "paper", "paper_std", "metric", "methods", *_NOTE}
_REFERENCE_KEYS = {"label", "paper", "paper_std", "metric", *_NOTE}
_COLUMN_KEYS = {"by", "labels", "mean", "groups", "average_over"}
_GROUP_KEYS = {"label", "overrides", "metric", *_NOTE}
_PROFILE_KEYS = {"base", "grid", "rows", "budget", "paired", *_NOTE}
_PROFILE_ROW_KEYS = {"label", "overrides", *_NOTE}
_PLOT_KEYS = {"x", "label", "logx"}
_SAFE = re.compile(r"[^A-Za-z0-9.+-]+")


# --------------------------------------------------------------------------- small helpers
def slugify(text: Any) -> str:
    """A file-name-safe form of a label or value: runs of other characters than [A-Za-z0-9.+=-] -> '-'."""
    slug = _SAFE.sub("-", str(text)).strip("-")
    return slug or "x"


def format_value(value: Any) -> str:
    """A Python/YAML value written in Hydra's override grammar (``key=<this>``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9_./:+-]+", text) and text.lower() not in {"true", "false", "null"}:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def override_key(override: str) -> str:
    """The key (or config group, with its @package) an override sets, without +/++/~ prefixes."""
    parsed = _parser().parse_override(override)
    return parsed.key_or_group + (f"@{parsed.package}" if parsed.package else "")


def merge_overrides(*lists: Iterable[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces the earlier one (in place of
    the earlier one's position, so defaults-list order is kept). ``~key`` removes an earlier ``key=...``."""
    merged: dict[str, str] = {}
    for lst in lists:
        for o in lst:
            key = override_key(o)
            if o.startswith("~") and key in merged and merged[key].startswith("+"):
                del merged[key]  # added, then removed: nothing to do
            else:
                merged[key] = o  # an existing key keeps its position (defaults-list order)
    return list(merged.values())


def _err(path: Path | str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_overrides(path, where: str, overrides: Any) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, str) or not isinstance(overrides, Sequence):
        raise _err(path, f"{where} must be a list of Hydra overrides, got {overrides!r}")
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    out = []
    for o in overrides:
        if not isinstance(o, str):
            raise _err(path, f"{where}: override {o!r} is not a string (write it as 'key=value')")
        try:
            parsed = _parser().parse_override(o)
        except OverrideParseException as exc:
            raise _err(path, f"{where}: cannot parse override {o!r}: {exc}") from None
        if parsed.value_type not in (None, ValueType.ELEMENT):
            raise _err(path, f"{where}: override {o!r} sweeps several values; put the values in `grid:`")
        if parsed.key_or_group.startswith("hydra"):
            raise _err(path, f"{where}: override {o!r} sets Hydra's own config; fsseg-sweep sets run directories "
                             "and launchers itself")  # fmt: skip
        out.append(o)
    return out


def _check_grid(path, where: str, grid: Any) -> dict[str, list]:
    if grid is None:
        return {}
    if not isinstance(grid, Mapping):
        raise _err(path, f"{where} must be a mapping 'key: [values]', got {grid!r}")
    out = {}
    for k, vals in grid.items():
        if not isinstance(k, str) or k.startswith(("hydra", "+", "~")):
            raise _err(path, f"{where}: bad grid key {k!r}")
        if not isinstance(vals, list) or not vals:
            raise _err(path, f"{where}.{k} must be a non-empty list of values, got {vals!r}")
        if len(set(map(repr, vals))) != len(vals):
            raise _err(path, f"{where}.{k} lists a value twice: {vals!r}")
        out[k] = list(vals)
    return out


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Column:
    """One column of the table: a value of the ``columns.by`` grid key, or a group with its own overrides."""

    label: str
    value: Any = None                       # the columns.by value (None for groups)
    overrides: tuple[str, ...] = ()         # groups only
    metric: str | None = None               # groups only: the metric this column reports
    is_group: bool = False                  # a `columns.groups` entry (its own overrides, its own run directories)

    @property
    def slug(self) -> str:
        return slugify(self.label)


@dataclass(frozen=True)
class Row:
    """A row of the table. ``paper`` maps a metric name to {column label: value}; a flat ``paper:`` of the file
    is stored under the key ``None`` ("as printed": the metric of the row / column / the table's first)."""

    label: str
    slug: str
    overrides: tuple[str, ...]
    paper: Mapping[str | None, Mapping[str, float | None]]
    paper_std: Mapping[str | None, Mapping[str, float | None]] = field(default_factory=dict)
    metric: str | None = None               # the metric this row reports (default: the table's)
    methods: tuple[str, ...] = ()
    index: int = 0
    reference: bool = False                 # a paper-only row (`reference:`): rendered, never run
    note: str = ""

    def paper_value(self, metric: str, label: str, first_metric: str, explicit: bool = False,
                    std: bool = False) -> float | None:  # fmt: skip
        """The paper's value of a cell reporting ``metric``. A flat ``paper:`` holds the numbers as printed: those
        of the row's / column's own metric (``explicit``), else of the table's first metric."""
        src = self.paper_std if std else self.paper
        if metric in src:
            return src[metric].get(label)
        if None in src and (explicit or self.metric is not None or metric == first_metric):
            return src[None].get(label)
        return None


@dataclass(frozen=True)
class Run:
    """One training+test run of a sweep."""

    sweep: str
    profile: str
    row: Row
    column: Column | None       # None when the table has a single (unnamed) column
    point: Mapping[str, Any]    # grid key -> value (the column key and seed included)
    overrides: tuple[str, ...]  # every override of the run, merged (base, row, group, grid) + sweep_name
    run_dir: Path
    unit: str                   # the Hydra-multirun unit: runs sharing all overrides but the grid
    grid_slug: str
    shared: bool = False        # the same overrides as an earlier row's run: that run (and directory) serves both

    @property
    def seed(self) -> Any:
        return self.point.get(SEED_KEY)

    def describe(self) -> str:
        pt = ", ".join(f"{k}={v}" for k, v in self.point.items())
        col = f" / {self.column.label}" if self.column and self.column.is_group else ""
        return f"{self.row.label}{col} [{pt}]" if pt else f"{self.row.label}{col}"


@dataclass
class Sweep:
    path: Path
    name: str
    paper: str
    title: str
    methods: tuple[str, ...]
    base: list[str]
    grid: dict[str, list]
    rows: list[Row]
    columns_by: str | None
    column_labels: list[str]                 # labels of the paper's columns, in order
    column_groups: list[Column]
    mean: bool
    metrics: list[str]
    average_over: list[str] = field(default_factory=list)
    source: str = ""
    dataset: str = ""
    budget: str = ""
    task: str = "train"
    plot: dict | None = None
    profiles: dict[str, dict] = field(default_factory=dict)
    reference: list[Row] = field(default_factory=list)
    note: str = ""
    paired: dict[str, str] = field(default_factory=dict)  # row label -> the row it is paired against

    # ---------------------------------------------------------------- profiles
    def profile_names(self) -> list[str]:
        return list(self.profiles)

    def _profile(self, profile: str | None) -> tuple[str, list[str], dict[str, list], dict[str, list] | None]:
        """(directory name, base, grid, {row label: overrides} or None = every row with its own overrides)."""
        if profile in (None, "", PAPER_PROFILE):
            return PAPER_PROFILE, list(self.base), dict(self.grid), None
        if profile not in self.profiles:
            raise ConfigError(
                f"{self.path}: no profile {profile!r}; profiles: {sorted(self.profiles) or 'none'} "
                f"(or leave PROFILE empty for the paper's protocol)"
            )
        p = self.profiles[profile]
        base = list(p["base"]) if p.get("base") is not None else list(self.base)
        grid = dict(self.grid)
        grid.update(p.get("grid") or {})
        return profile, base, grid, p.get("rows")

    def effective_grid(self, profile: str | None = None) -> dict[str, list]:
        return self._profile(profile)[2]

    def rows_run(self, profile: str | None = None) -> list[Row]:
        """The rows this profile runs (a profile with `rows:` runs only those)."""
        prow = self._profile(profile)[3]
        return [r for r in self.rows if prow is None or r.label in prow]

    def pairs(self, profile: str | None = None) -> list[tuple[Row, Row]]:
        """(row, baseline) pairs of the paired differences: the profile's ``paired:`` (else the table's), each
        naming a row and the row it is compared with; without one, every row run against the first row run."""
        rows = self.rows_run(profile)
        if not rows:
            return []
        named = self.paired
        if profile not in (None, "", PAPER_PROFILE) and self.profiles[profile].get("paired") is not None:
            named = self.profiles[profile]["paired"]
        if not named:
            return [(r, rows[0]) for r in rows[1:]]
        by_label = {r.label: r for r in rows}
        return [(by_label[a], by_label[b]) for a, b in named.items() if a in by_label and b in by_label]

    def columns(self, profile: str | None = None) -> list[Column]:
        """The columns this profile runs, in the paper's order (a profile may run a subset)."""
        if self.column_groups:
            return list(self.column_groups)
        if self.columns_by is None:  # one column, possibly named by `columns.labels`
            return [Column(label=self.column_labels[0])] if self.column_labels else []
        grid = self.effective_grid(profile)
        paper_vals = self.grid.get(self.columns_by, [])
        cols = []
        for v in grid[self.columns_by]:
            idx = next((i for i, pv in enumerate(paper_vals) if pv == v), None)
            label = self.column_labels[idx] if idx is not None else f"{self.columns_by}={v}"
            cols.append(Column(label=label, value=v))
        order = {c: i for i, c in enumerate(self.column_labels)}
        return sorted(cols, key=lambda c: order.get(c.label, len(order)))

    def all_columns_run(self, profile: str | None = None) -> bool:
        """True when the profile runs every column the paper reports (its Mean is then comparable)."""
        if self.column_groups or self.columns_by is None:
            return True
        return [c.label for c in self.columns(profile)] == list(self.column_labels)

    # ---------------------------------------------------------------- runs
    def required_methods(self, profile: str | None = None) -> list[str]:
        """conf/method names the table needs: ``methods:``, rows' ``methods``, and every ``method=`` override."""
        found = list(self.methods)
        for row in self.rows:
            found += list(row.methods)
        overrides = self.base + [o for r in self.rows for o in r.overrides]
        for p in self.profiles.values():
            overrides += list(p.get("base") or []) + [o for ov in (p.get("rows") or {}).values() for o in ov]
        for o in overrides:
            if override_key(o) == "method":
                found.append(o.split("=", 1)[1].strip())
        return list(dict.fromkeys(found))

    def expand(self, profile: str | None = None, out: str | os.PathLike = "outputs/sweeps") -> list[Run]:
        """Every run of the table under ``profile`` (None = the paper's protocol): rows x columns x grid.
        Rows whose runs would have identical overrides share them (``Run.shared``: same directory)."""
        prof, base, grid, prow = self._profile(profile)
        root = Path(out) / self.name / prof
        # The grid is expanded with the column key (if any) first, the seed last.
        keys = list(grid)
        if self.columns_by in keys:
            keys.remove(self.columns_by)
            keys.insert(0, self.columns_by)
        if SEED_KEY in keys:
            keys.remove(SEED_KEY)
            keys.append(SEED_KEY)
        cols_by_value = {repr(c.value): c for c in self.columns(profile)} if not self.column_groups else {}
        single = self.columns(profile)[0] if self.columns_by is None and not self.column_groups and self.column_labels else None
        runs: list[Run] = []
        seen: dict[tuple, Run] = {}
        groups: list[Column | None] = list(self.column_groups) or [None]
        for row in self.rows_run(profile):
            row_over = tuple(prow[row.label]) if prow is not None else row.overrides
            for group in groups:
                unit = row.slug if group is None else f"{row.slug}/{group.slug}"
                for combo in itertools.product(*(grid[k] for k in keys)):
                    point = dict(zip(keys, combo))
                    grid_slug = "_".join(f"{k}-{slugify(v)}" for k, v in point.items()) or "default"
                    if group is not None:
                        grid_slug = f"{group.slug}_{grid_slug}" if point else group.slug
                    column = group or single or cols_by_value.get(repr(point.get(self.columns_by)))
                    overrides = tuple(merge_overrides(
                        base,
                        row_over,
                        group.overrides if group is not None else (),
                        [f"{k}={format_value(v)}" for k, v in point.items()],
                        [f"+sweep_name={format_value(self.name)}"],
                    ))  # fmt: skip
                    first = seen.get(overrides)
                    run = Run(sweep=self.name, profile=prof, row=row, column=column, point=point, overrides=overrides,
                              run_dir=first.run_dir if first else root / row.slug / grid_slug,
                              unit=first.unit if first else unit, grid_slug=first.grid_slug if first else grid_slug,
                              shared=first is not None)  # fmt: skip
                    seen.setdefault(overrides, run)
                    runs.append(run)
        dirs = [r.run_dir for r in runs if not r.shared]
        if len(set(dirs)) != len(dirs):
            dup = next(d for d in dirs if dirs.count(d) > 1)
            raise _err(self.path, f"two runs share the run directory {dup}; make row labels / grid values distinct")
        return runs

    def root(self, profile: str | None = None, out: str | os.PathLike = "outputs/sweeps") -> Path:
        return Path(out) / self.name / self._profile(profile)[0]


# --------------------------------------------------------------------------- loading
def _note(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else "; ".join(map(str, value)) if isinstance(value, list) else str(value)


def _parse_paper(path, where: str, paper: Any, labels: list[str], metrics: list[str], key: str = "paper") -> dict:
    """Normalise a row's ``paper:`` to {metric: {label: value}}; a flat mapping is stored under None."""
    if paper is None:
        return {}
    if not isinstance(paper, Mapping):
        raise _err(path, f"{where}.{key} must be a mapping 'column label: number or null', got {paper!r}")
    nested = bool(paper) and all(isinstance(v, Mapping) for v in paper.values()) and all(k not in labels for k in paper)
    by_metric = {str(k): v for k, v in paper.items()} if nested else {None: paper}
    out: dict = {}
    for metric, values in by_metric.items():
        cur = {}
        for label, value in values.items():
            label = str(label)
            if label not in labels:
                raise _err(path, f"{where}.{key}: column {label!r} is not one of the table's columns {labels}"
                                 + (f" (metric {metric})" if nested else ""))  # fmt: skip
            if value is not None and not _is_number(value):
                raise _err(path, f"{where}.{key}.{label}: {value!r} is not a number or null (as printed)")
            cur[label] = None if value is None else float(value)
        out[metric] = cur
    return out


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and validate a sweep file; every problem raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise _err(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise _err(path, "expected a mapping at the top level (see sweeps/FORMAT.md)")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(path, f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise _err(path, f"missing key(s) {missing} (see sweeps/FORMAT.md)")
    name = data["name"]
    if not isinstance(name, str) or slugify(name) != name:
        raise _err(path, f"name {name!r} must be a plain slug like 'apanet-table4'")
    if "metric" in data and "metrics" in data:
        raise _err(path, "give either `metric:` or `metrics:`, not both")
    metrics = data.get("metrics", data.get("metric", "miou"))
    metrics = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise _err(path, f"metric(s) must be a name or a list of names, got {metrics!r}")
    methods = data["methods"]
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
        raise _err(path, f"methods must be a list of conf/method names, got {methods!r}")
    task = data.get("task", "train")
    if not isinstance(task, str):
        raise _err(path, f"task must be a name, got {task!r}")
    base = _check_overrides(path, "base", data["base"])
    grid = _check_grid(path, "grid", data.get("grid"))

    cols = data["columns"]
    if not isinstance(cols, Mapping):
        raise _err(path, f"columns must be a mapping, got {cols!r}")
    if set(cols) - _COLUMN_KEYS:
        raise _err(path, f"columns: unknown key(s) {sorted(set(cols) - _COLUMN_KEYS)}; allowed {sorted(_COLUMN_KEYS)}")
    by, groups, labels = cols.get("by"), [], []
    mean = bool(cols.get("mean", False))
    average_over = cols.get("average_over") or []
    if not isinstance(average_over, list) or any(k not in grid for k in average_over):
        raise _err(path, f"columns.average_over must list grid keys ({sorted(grid)}), got {average_over!r}")
    if "groups" in cols:
        if by is not None or "labels" in cols:
            raise _err(path, "columns: give either `by` + `labels` or `groups`, not both")
        if not isinstance(cols["groups"], list) or not cols["groups"]:
            raise _err(path, "columns.groups must be a non-empty list of {label, overrides}")
        for i, g in enumerate(cols["groups"]):
            if not isinstance(g, Mapping) or "label" not in g or set(g) - _GROUP_KEYS:
                raise _err(path, f"columns.groups[{i}] must be a mapping with keys {sorted(_GROUP_KEYS)}, got {g!r}")
            metric = g.get("metric")
            if metric is not None and not isinstance(metric, str):
                raise _err(path, f"columns.groups[{i}].metric must be a metric name, got {metric!r}")
            groups.append(
                Column(label=str(g["label"]), overrides=tuple(_check_overrides(path, f"columns.groups[{i}].overrides",
                       g.get("overrides"))), metric=metric, is_group=True)  # fmt: skip
            )
        labels = [g.label for g in groups]
    elif by is not None:
        if by not in grid:
            raise _err(path, f"columns.by {by!r} is not a key of grid {sorted(grid)}")
        if by in average_over:
            raise _err(path, f"columns.by {by!r} cannot also be averaged over")
        labels = [str(x) for x in cols.get("labels") or [f"{by}={v}" for v in grid[by]]]
        if len(labels) != len(grid[by]):
            raise _err(path, f"columns.labels has {len(labels)} labels but grid.{by} has {len(grid[by])} values")
    elif "labels" in cols:
        if len(cols["labels"]) != 1:
            raise _err(path, "columns.labels without `by` must name exactly one column")
        labels = [str(cols["labels"][0])]
    if len(set(labels)) != len(labels):
        raise _err(path, f"column labels repeat: {labels}")
    if mean and MEAN in labels:
        raise _err(path, f"a column is labelled {MEAN!r} and columns.mean is true")
    free = {by, SEED_KEY, *average_over}
    for k, vals in grid.items():
        if k not in free and len(vals) > 1:
            raise _err(path, f"grid.{k} has several values but is neither columns.by ({by}), {SEED_KEY!r} nor in "
                             "columns.average_over: make it the column key, average over it, or one row per value")  # fmt: skip
    all_labels = labels + ([MEAN] if mean else [])
    if not all_labels:
        all_labels = ["value"]

    def parse_row(i: int, r: Any, kind: str, allowed: set) -> Row:
        where = f"{kind}[{i}]"
        if not isinstance(r, Mapping) or "label" not in r:
            raise _err(path, f"{where} must be a mapping with at least `label`, got {r!r}")
        if set(r) - allowed:
            raise _err(path, f"{where}: unknown key(s) {sorted(set(r) - allowed)}; allowed {sorted(allowed)}")
        metric = r.get("metric")
        if metric is not None and not isinstance(metric, str):
            raise _err(path, f"{where}.metric must be a metric name, got {metric!r}")
        row_methods = r.get("methods") or []
        row_methods = [row_methods] if isinstance(row_methods, str) else list(row_methods)
        return Row(
            label=str(r["label"]), slug=slugify(r["label"]),
            overrides=tuple(_check_overrides(path, f"{where}.overrides", r.get("overrides"))),
            paper=_parse_paper(path, where, r.get("paper"), all_labels, metrics),
            paper_std=_parse_paper(path, where, r.get("paper_std"), all_labels, metrics, key="paper_std"),
            metric=metric, methods=tuple(row_methods), index=i, reference=kind == "reference",
            note=_note(r.get("note", r.get("notes"))),
        )  # fmt: skip

    if not isinstance(data["rows"], list) or not data["rows"]:
        raise _err(path, "rows must be a non-empty list")
    rows, slugs = [], set()
    for i, r in enumerate(data["rows"]):
        row = parse_row(i, r, "rows", _ROW_KEYS)
        if row.slug in slugs:
            row = Row(**{**row.__dict__, "slug": f"{row.slug}-{i}"})
        slugs.add(row.slug)
        rows.append(row)
    if len({r.label for r in rows}) != len(rows):
        raise _err(path, "row labels repeat")
    reference = data.get("reference") or []
    if not isinstance(reference, list):
        raise _err(path, "reference must be a list of {label, paper} rows (the paper's numbers only)")
    reference = [parse_row(i, r, "reference", _REFERENCE_KEYS) for i, r in enumerate(reference)]

    def parse_paired(where: str, value: Any, known: set[str]) -> dict[str, str] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not value:
            raise _err(path, f"{where} must be a mapping {{row label: baseline row label}}, got {value!r}")
        out = {}
        for a, b in value.items():
            for lab in (a, b):
                if str(lab) not in known:
                    raise _err(path, f"{where}: no row labelled {lab!r} among {sorted(known)}")
            if str(a) == str(b):
                raise _err(path, f"{where}: row {a!r} is paired with itself")
            out[str(a)] = str(b)
        return out

    paired = parse_paired("paired", data.get("paired"), {r.label for r in rows}) or {}

    plot = data.get("plot")
    if plot is not None:
        if not isinstance(plot, Mapping) or "x" not in plot or set(plot) - _PLOT_KEYS:
            raise _err(path, f"plot must be a mapping with `x` (and optional {sorted(_PLOT_KEYS - {'x'})}), got {plot!r}")
        plot = dict(plot)

    profiles = {}
    for pname, p in (data.get("profiles") or {}).items():
        if pname == PAPER_PROFILE or slugify(pname) != pname:
            raise _err(path, f"profile name {pname!r} is reserved or not a slug")
        if not isinstance(p, Mapping) or set(p) - _PROFILE_KEYS:
            raise _err(path, f"profiles.{pname} must be a mapping with keys among {sorted(_PROFILE_KEYS)}, got {p!r}")
        pgrid = _check_grid(path, f"profiles.{pname}.grid", p.get("grid"))
        for k in pgrid:
            if k not in grid and len(pgrid[k]) > 1 and k != SEED_KEY:
                raise _err(path, f"profiles.{pname}.grid.{k}: a profile may only narrow the table's grid keys")
        if by is not None and by in pgrid:
            extra = [v for v in pgrid[by] if v not in grid[by]]
            if extra:
                raise _err(path, f"profiles.{pname}.grid.{by}: {extra} are not columns of the table ({grid[by]})")
        prow = None
        if p.get("rows") is not None:
            if not isinstance(p["rows"], list):
                raise _err(path, f"profiles.{pname}.rows must be a list of {{label, overrides}}")
            prow = {}
            known = {r.label for r in rows}
            for i, r in enumerate(p["rows"]):
                where = f"profiles.{pname}.rows[{i}]"
                if not isinstance(r, Mapping) or "label" not in r or set(r) - _PROFILE_ROW_KEYS:
                    raise _err(path, f"{where} must be a mapping with keys among {sorted(_PROFILE_ROW_KEYS)}, got {r!r}")
                if str(r["label"]) not in known:
                    raise _err(path, f"{where}: no row labelled {r['label']!r} in rows")
                prow[str(r["label"])] = _check_overrides(path, f"{where}.overrides", r.get("overrides"))
        profiles[pname] = {
            "base": _check_overrides(path, f"profiles.{pname}.base", p["base"]) if "base" in p else None,
            "grid": pgrid,
            "rows": prow,
            "paired": parse_paired(f"profiles.{pname}.paired", p.get("paired"),
                                   set(prow) if prow is not None else {r.label for r in rows}),
            "budget": p.get("budget", ""),
        }
    dataset = data.get("dataset", "")
    return Sweep(
        path=path, name=name, paper=str(data["paper"]), title=str(data["title"]), methods=tuple(methods),
        base=base, grid=grid, rows=rows, columns_by=by, column_labels=labels, column_groups=groups, mean=mean,
        metrics=list(metrics), average_over=list(average_over), source=str(data.get("source", "")),
        dataset=", ".join(map(str, dataset)) if isinstance(dataset, list) else str(dataset),
        budget=str(data.get("budget", "")), task=task, plot=plot, profiles=profiles, reference=reference,
        note=_note(data.get("note", data.get("notes"))), paired=paired,
    )  # fmt: skip


# --------------------------------------------------------------------------- finding files
def sweeps_dir() -> Path:
    """sweeps/: $FSSEG_SWEEPS, else ./sweeps, else the checkout's sweeps/ next to src/."""
    for c in (os.environ.get("FSSEG_SWEEPS"), Path.cwd() / "sweeps", Path(__file__).resolve().parents[2] / "sweeps"):
        if c and Path(c).is_dir():
            return Path(c).resolve()
    raise ConfigError("cannot find the sweeps/ directory (looked at $FSSEG_SWEEPS, ./sweeps and the checkout)")


def list_sweeps(directory: str | os.PathLike | None = None) -> list[Path]:
    """Every sweep file under ``directory`` (default: sweeps_dir()), sorted."""
    d = Path(directory) if directory else sweeps_dir()
    return sorted(p for p in d.rglob("*.yaml") if p.is_file())


def find_sweep(name_or_path: str | os.PathLike, directory: str | os.PathLike | None = None) -> Path:
    """``apanet-table4`` -> sweeps/apanet/table4.yaml; an existing file path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    name = str(name_or_path)
    d = Path(directory) if directory else sweeps_dir()
    if "-" in name:
        paper, table = name.split("-", 1)
        cand = d / paper / f"{table}.yaml"
        if cand.is_file():
            return cand
    for f in list_sweeps(d):
        try:
            if (yaml.safe_load(f.read_text()) or {}).get("name") == name:
                return f
        except (yaml.YAMLError, AttributeError):
            continue
    known = ", ".join(sweep_name_of(f, d) for f in list_sweeps(d)) or "none"
    raise ConfigError(f"no sweep named {name!r} under {d} (expected {d}/<paper>/<table>.yaml); known: {known}")


def sweep_name_of(path: Path, directory: Path | None = None) -> str:
    """The make-target name of a sweep file: sweeps/apanet/table4.yaml -> apanet-table4."""
    d = Path(directory) if directory else path.parent.parent
    rel = path.resolve().relative_to(Path(d).resolve()).with_suffix("")
    return "-".join(rel.parts)


# --------------------------------------------------------------------------- methods and configs
def missing_methods(sweep: Sweep, conf_dir: str | os.PathLike) -> list[str]:
    """Methods the table needs that have no conf/method/<m>.yaml."""
    return [m for m in sweep.required_methods() if not (Path(conf_dir) / "method" / f"{m}.yaml").is_file()]


def compose_run_configs(items: Sequence[tuple[Sequence[str], str | os.PathLike]], conf_dir: str | os.PathLike) -> list:
    """For each (overrides, run_dir): the resolved configuration fsseg-train would record in
    ``run_dir/config.yaml``, as a plain dict, or the exception composing it raised (unknown key, bad value...).
    One Hydra initialisation for all of them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from fsseg.resolvers import register_resolvers

    register_resolvers()
    out: list = []
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        for overrides, run_dir in items:
            try:
                cfg = compose("train", overrides=list(overrides))
                with open_dict(cfg):
                    cfg.run_dir = str(Path(run_dir).resolve())
                out.append(yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True)))
            except Exception as exc:  # noqa: BLE001 - reported per run
                out.append(exc)
    return out


def compose_run_config(overrides: Sequence[str], run_dir: str | os.PathLike, conf_dir: str | os.PathLike) -> dict:
    """The resolved configuration fsseg-train would record for these overrides (raises on composition errors)."""
    (cfg,) = compose_run_configs([(overrides, run_dir)], conf_dir)
    if isinstance(cfg, Exception):
        raise cfg
    return cfg


def finished_runs(out: str | os.PathLike) -> dict[str, Path]:
    """``run_identity`` -> directory of every finished sweep run under ``out`` (``<sweep>/<profile>/<row>/<point>``;
    set-aside ``_stale`` runs and runs of another code version excluded); the first in path order wins."""
    found: dict[str, Path] = {}
    for m in sorted(Path(out).glob("*/*/*/*/metrics.json")):
        cfg = recorded_config(m.parent)
        if cfg is not None and "_stale" not in m.parts and code_matches(m.parent):
            found.setdefault(run_identity(cfg), m.parent)
    return found
