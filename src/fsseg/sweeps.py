"""Paper-table sweep files: parsing, validation and expansion into runs (format: sweeps/FORMAT.md).

A sweep file ``sweeps/<paper>/<table>.yaml`` describes one table of a paper: Hydra overrides common to every
run (``base``), a grid multiplied into every row (``grid``: folds, seeds...), the rows (each with its
overrides and the paper's numbers) and which grid key makes the columns (``columns.by``). ``profiles`` give
small budgets of the same grid (e.g. the embedded benchmark). The format is a schema (:class:`SweepSpec`,
pydantic); this module turns a file into a list of :class:`Run` with deterministic run directories::

    <out>/<name>/<profile or "paper">/<row slug>/<grid slug>

A run is finished when fsseg.runs says so: ``metrics.json`` present, and the recorded ``config.yaml`` and
code version equal what the sweep would run now (so a changed budget, override or code re-runs it).

    from fsseg.sweeps import load_sweep, find_sweep
    sweep = load_sweep(find_sweep("apanet-table4"))
    runs = sweep.expand(profile="embedded", out="outputs/sweeps")
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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
    "FAILED_FILE",
    "MEAN",
    "PAPER_PROFILE",
    "SPEC_FILE",
    "Column",
    "Row",
    "Run",
    "Sweep",
    "SweepSpec",
    "code_matches",
    "compose_run_config",
    "compose_run_configs",
    "config_diff",
    "config_digest",
    "find_sweep",
    "finished_runs",
    "format_value",
    "list_sweeps",
    "load_sweep",
    "merge_overrides",
    "missing_methods",
    "override_key",
    "recorded_config",
    "run_identity",
    "run_status",
    "slugify",
    "sweep_name_of",
    "sweeps_dir",
    "without_defaults",
]  # fmt: skip

PAPER_PROFILE = "paper"   # directory name of the paper's protocol (no profile)
MEAN = "Mean"             # the optional mean column's label
SPEC_FILE = "sweep.json"  # run_dir/sweep.json: what the sweep asked this run to be (written at launch)
SEED_KEY = "seed"
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


# --------------------------------------------------------------------------- the schema (sweeps/FORMAT.md)
class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Overrides = list[str]
Notes = str | list[str] | None


class RowSpec(_Spec):
    label: str
    overrides: Overrides = []
    metric_suffix: str = ""  # read <metric><suffix> from the runs (e.g. _meta: the meta learner alone)
    paper: dict[str, float | None | dict[str, float | None]] = {}  # {column: value} or {metric: {column: value}}
    notes: Notes = None


class ProfileRowSpec(_Spec):
    label: str
    overrides: Overrides = []


class ColumnsSpec(_Spec):
    by: str | None = None          # a grid key: one column per value
    labels: list[str] | None = None
    mean: bool = False


class PlotSpec(_Spec):
    x: str
    label: str | None = None


class ProfileSpec(_Spec):
    base: Overrides | None = None  # replaces the table's base
    overrides: Overrides = []      # applied after every row's overrides (e.g. the embedded recipe)
    grid: dict[str, list[Any]] = {}
    rows: list[ProfileRowSpec] | None = None  # only these rows, with these overrides
    paired: dict[str, str] | None = None
    budget: str = ""
    notes: Notes = None


class SweepSpec(_Spec):
    name: str
    paper: str
    title: str
    source: str = ""
    dataset: str = ""
    metric: str | None = None
    metrics: list[str] | None = None
    methods: list[str]
    budget: str = ""
    base: Overrides
    grid: dict[str, list[Any]] = {}
    columns: ColumnsSpec
    rows: list[RowSpec]
    plot: PlotSpec | None = None
    paired: dict[str, str] | None = None
    profiles: dict[str, ProfileSpec] = {}
    notes: Notes = None


def _schema_error(path: Path, exc: ValidationError) -> ConfigError:
    """The first problems pydantic found, each named by its dotted key."""
    unknown, lines = [], []
    for e in exc.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            unknown.append(loc)
        elif e["type"] == "missing":
            lines.append(f"missing key {loc!r} (see sweeps/FORMAT.md)")
        elif e["type"] == "dict_type":
            lines.append(f"{loc} must be a mapping, got {e['input']!r}")
        elif e["type"] == "list_type":
            lines.append(f"{loc} must be a list, got {e['input']!r}")
        elif e["type"] in ("float_type", "float_parsing", "finite_number"):
            lines.append(f"{loc}: {e['input']!r} is not a number or null (as printed)")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e['input']!r})")
    if unknown:
        lines.insert(0, f"unknown key(s) {unknown} (see sweeps/FORMAT.md)")
    return ConfigError(f"{path}: " + "; ".join(dict.fromkeys(lines[:4])))


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Column:
    """One column of the table: a value of the ``columns.by`` grid key (or the single column of a table)."""

    label: str
    value: Any = None

    @property
    def slug(self) -> str:
        return slugify(self.label)


@dataclass(frozen=True)
class Row:
    """A row of the table. ``paper`` maps a metric name to {column label: value}; a flat ``paper:`` of the file
    is stored under the key ``None`` (the numbers of the table's first metric, as printed)."""

    label: str
    slug: str
    overrides: tuple[str, ...]
    paper: Mapping[str | None, Mapping[str, float | None]]
    index: int = 0
    note: str = ""
    metric_suffix: str = ""  # the row reads ``<metric><suffix>`` of its runs (``_meta``: BAM's meta learner alone)

    def paper_value(self, metric: str, label: str, first_metric: str) -> float | None:
        if metric in self.paper:
            return self.paper[metric].get(label)
        if None in self.paper and metric == first_metric:
            return self.paper[None].get(label)
        return None


@dataclass(frozen=True)
class Run:
    """One training+test run of a sweep."""

    sweep: str
    profile: str
    row: Row
    column: Column | None       # None when the table has no named column
    point: Mapping[str, Any]    # grid key -> value (the column key and seed included)
    overrides: tuple[str, ...]  # every override of the run, merged (base, row, profile, grid) + sweep_name
    run_dir: Path
    unit: str                   # the Hydra-multirun unit: runs sharing all overrides but the grid
    grid_slug: str
    shared: bool = False        # the same overrides as an earlier row's run: that run (and directory) serves both

    @property
    def seed(self) -> Any:
        return self.point.get(SEED_KEY)

    def describe(self) -> str:
        pt = ", ".join(f"{k}={v}" for k, v in self.point.items())
        return f"{self.row.label} [{pt}]" if pt else self.row.label


@dataclass(frozen=True)
class Profile:
    base: tuple[str, ...] | None
    overrides: tuple[str, ...]
    grid: Mapping[str, list]
    rows: Mapping[str, tuple[str, ...]] | None
    paired: Mapping[str, str] | None
    budget: str = ""


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
    mean: bool
    metrics: list[str]
    source: str = ""
    dataset: str = ""
    budget: str = ""
    plot: dict | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)
    note: str = ""
    paired: dict[str, str] = field(default_factory=dict)  # row label -> the row it is paired against

    # ---------------------------------------------------------------- profiles
    def profile_names(self) -> list[str]:
        return list(self.profiles)

    def _profile(self, profile: str | None) -> tuple[str, Profile | None]:
        if profile in (None, "", PAPER_PROFILE):
            return PAPER_PROFILE, None
        if profile not in self.profiles:
            raise ConfigError(
                f"{self.path}: no profile {profile!r}; profiles: {sorted(self.profiles) or 'none'} "
                f"(or leave PROFILE empty for the paper's protocol)"
            )
        return profile, self.profiles[profile]

    def profile_base(self, profile: str | None = None) -> list[str]:
        p = self._profile(profile)[1]
        return list(p.base) if p is not None and p.base is not None else list(self.base)

    def effective_grid(self, profile: str | None = None) -> dict[str, list]:
        p = self._profile(profile)[1]
        return {**self.grid, **(p.grid if p is not None else {})}

    def rows_run(self, profile: str | None = None) -> list[Row]:
        """The rows this profile runs (a profile with `rows:` runs only those)."""
        p = self._profile(profile)[1]
        return [r for r in self.rows if p is None or p.rows is None or r.label in p.rows]

    def pairs(self, profile: str | None = None) -> list[tuple[Row, Row]]:
        """(row, baseline) pairs of the paired differences: the profile's ``paired:`` (else the table's), each
        naming a row and the row it is compared with; without one, every row run against the first row run."""
        rows = self.rows_run(profile)
        if not rows:
            return []
        p = self._profile(profile)[1]
        named = p.paired if p is not None and p.paired is not None else self.paired
        if not named:
            return [(r, rows[0]) for r in rows[1:]]
        by_label = {r.label: r for r in rows}
        return [(by_label[a], by_label[b]) for a, b in named.items() if a in by_label and b in by_label]

    def columns(self, profile: str | None = None) -> list[Column]:
        """The columns this profile runs, in the paper's order (a profile may run a subset)."""
        if self.columns_by is None:  # one column, possibly named by `columns.labels`
            return [Column(label=self.column_labels[0])] if self.column_labels else []
        paper_vals = self.grid.get(self.columns_by, [])
        cols = []
        for v in self.effective_grid(profile)[self.columns_by]:
            idx = next((i for i, pv in enumerate(paper_vals) if pv == v), None)
            cols.append(Column(label=self.column_labels[idx] if idx is not None else f"{self.columns_by}={v}", value=v))
        order = {c: i for i, c in enumerate(self.column_labels)}
        return sorted(cols, key=lambda c: order.get(c.label, len(order)))

    def all_columns_run(self, profile: str | None = None) -> bool:
        """True when the profile runs every column the paper reports (its Mean is then comparable)."""
        return self.columns_by is None or [c.label for c in self.columns(profile)] == list(self.column_labels)

    # ---------------------------------------------------------------- runs
    def required_methods(self) -> list[str]:
        """conf/method names the table needs: ``methods:`` and every ``method=`` override."""
        found = list(self.methods)
        overrides = self.base + [o for r in self.rows for o in r.overrides]
        for p in self.profiles.values():
            overrides += [*(p.base or ()), *p.overrides, *(o for ov in (p.rows or {}).values() for o in ov)]
        for o in overrides:
            if override_key(o) == "method":
                found.append(o.split("=", 1)[1].strip())
        return list(dict.fromkeys(found))

    def expand(self, profile: str | None = None, out: str | os.PathLike = "outputs/sweeps") -> list[Run]:
        """Every run of the table under ``profile`` (None = the paper's protocol): rows x grid. Overrides merge
        in the order base (or the profile's), row (or the profile's row), the profile's ``overrides``, grid
        point. Rows whose runs would have identical overrides share them (``Run.shared``: same directory)."""
        prof, p = self._profile(profile)
        base, grid = self.profile_base(profile), self.effective_grid(profile)
        root = Path(out) / self.name / prof
        keys = list(grid)  # the column key (if any) first, the seed last
        if self.columns_by in keys:
            keys.remove(self.columns_by)
            keys.insert(0, self.columns_by)
        if SEED_KEY in keys:
            keys.remove(SEED_KEY)
            keys.append(SEED_KEY)
        columns = self.columns(profile)
        by_value = {repr(c.value): c for c in columns}
        single = columns[0] if self.columns_by is None and columns else None
        runs: list[Run] = []
        seen: dict[tuple, Run] = {}
        for row in self.rows_run(profile):
            row_over = p.rows[row.label] if p is not None and p.rows is not None else row.overrides
            for combo in itertools.product(*(grid[k] for k in keys)):
                point = dict(zip(keys, combo))
                grid_slug = "_".join(f"{k}-{slugify(v)}" for k, v in point.items()) or "default"
                overrides = tuple(merge_overrides(
                    base, row_over, p.overrides if p is not None else (),
                    [f"{k}={format_value(v)}" for k, v in point.items()], [f"+sweep_name={format_value(self.name)}"],
                ))  # fmt: skip
                first = seen.get(overrides)
                run = Run(sweep=self.name, profile=prof, row=row, column=single or by_value.get(repr(point.get(self.columns_by))),
                          point=point, overrides=overrides, run_dir=first.run_dir if first else root / row.slug / grid_slug,
                          unit=first.unit if first else row.slug, grid_slug=first.grid_slug if first else grid_slug,
                          shared=first is not None)  # fmt: skip
                seen.setdefault(overrides, run)
                runs.append(run)
        return runs

    def root(self, profile: str | None = None, out: str | os.PathLike = "outputs/sweeps") -> Path:
        return Path(out) / self.name / self._profile(profile)[0]


# --------------------------------------------------------------------------- loading
def _note(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else "; ".join(map(str, value))


def _check_overrides(path: Path, where: str, overrides: Sequence[str]) -> tuple[str, ...]:
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    for o in overrides:
        try:
            parsed = _parser().parse_override(o)
        except OverrideParseException as exc:
            raise _err(path, f"{where}: cannot parse override {o!r}: {exc}") from None
        if parsed.value_type not in (None, ValueType.ELEMENT):
            raise _err(path, f"{where}: override {o!r} sweeps several values; put the values in `grid:`")
        if parsed.key_or_group.startswith("hydra"):
            raise _err(path, f"{where}: override {o!r} sets Hydra's own config; fsseg-sweep sets run directories "
                             "and launchers itself")  # fmt: skip
    return tuple(overrides)


def _check_grid(path: Path, where: str, grid: Mapping[str, list]) -> dict[str, list]:
    for k, vals in grid.items():
        if k.startswith(("hydra", "+", "~")) or not vals:
            raise _err(path, f"{where}.{k}: a grid key must be a config key with a non-empty list of values")
        if len(set(map(repr, vals))) != len(vals):
            raise _err(path, f"{where}.{k} lists a value twice: {vals!r}")
    return {k: list(v) for k, v in grid.items()}


def _paper(path: Path, where: str, paper: Mapping, labels: list[str], metrics: list[str]) -> dict:
    """A row's ``paper:`` as {metric: {label: value}}; a flat mapping is stored under None."""
    nested = bool(paper) and all(isinstance(v, Mapping) for v in paper.values())
    if not nested and any(isinstance(v, Mapping) for v in paper.values()):
        raise _err(path, f"{where}.paper: give either {{column: value}} or {{metric: {{column: value}}}}")
    by_metric = dict(paper) if nested else {None: paper}
    for metric, values in by_metric.items():
        if nested and metric not in metrics:
            raise _err(path, f"{where}.paper: {metric!r} is not one of the table's metrics {metrics}")
        for label in values:
            if label not in labels:
                raise _err(path, f"{where}.paper: column {label!r} is not one of the table's columns {labels}")
    return by_metric


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep file, check it against the schema (:class:`SweepSpec`) and its cross-references; every
    problem raises ConfigError naming the file and the key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise _err(path, f"not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise _err(path, "expected a mapping at the top level (see sweeps/FORMAT.md)")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _schema_error(path, exc) from None
    if slugify(spec.name) != spec.name:
        raise _err(path, f"name {spec.name!r} must be a plain slug like 'apanet-table4'")
    if spec.metric is not None and spec.metrics is not None:
        raise _err(path, "give either `metric:` or `metrics:`, not both")
    metrics = spec.metrics or [spec.metric or "miou"]
    base = list(_check_overrides(path, "base", spec.base))
    grid = _check_grid(path, "grid", spec.grid)

    by, cols = spec.columns.by, spec.columns
    if by is not None:
        if by not in grid:
            raise _err(path, f"columns.by {by!r} is not a key of grid {sorted(grid)}")
        labels = cols.labels or [f"{by}={v}" for v in grid[by]]
        if len(labels) != len(grid[by]):
            raise _err(path, f"columns.labels has {len(labels)} labels but grid.{by} has {len(grid[by])} values")
    else:
        labels = list(cols.labels or [])
        if len(labels) > 1:
            raise _err(path, "columns.labels without `by` must name exactly one column")
    if len(set(labels)) != len(labels) or (cols.mean and MEAN in labels):
        raise _err(path, f"column labels repeat: {labels + [MEAN] * cols.mean}")
    for k, vals in grid.items():
        if k not in (by, SEED_KEY) and len(vals) > 1:
            raise _err(path, f"grid.{k} has several values but is neither columns.by ({by}) nor {SEED_KEY!r}: make "
                             "it the column key, or one row per value")  # fmt: skip
    all_labels = (labels + [MEAN] * cols.mean) or ["value"]

    if not spec.rows:
        raise _err(path, "rows must be a non-empty list")
    rows, slugs = [], set()
    for i, r in enumerate(spec.rows):
        slug = slugify(r.label)
        slug = f"{slug}-{i}" if slug in slugs else slug
        slugs.add(slug)
        if r.metric_suffix and not re.fullmatch(r"_[a-z0-9_]+", r.metric_suffix):
            raise _err(path, f"rows[{i}].metric_suffix: {r.metric_suffix!r} is not a metric-name suffix such as '_meta'")
        rows.append(Row(label=r.label, slug=slug, overrides=_check_overrides(path, f"rows[{i}].overrides", r.overrides),
                        paper=_paper(path, f"rows[{i}]", r.paper, all_labels, metrics), index=i, note=_note(r.notes),
                        metric_suffix=r.metric_suffix))  # fmt: skip
    known = {r.label for r in rows}
    if len(known) != len(rows):
        raise _err(path, "row labels repeat")

    def paired(where: str, value: Mapping[str, str] | None, known: set[str]) -> dict[str, str] | None:
        if value is None:
            return None
        for a, b in value.items():
            for lab in (a, b):
                if lab not in known:
                    raise _err(path, f"{where}: no row labelled {lab!r} among {sorted(known)}")
            if a == b:
                raise _err(path, f"{where}: row {a!r} is paired with itself")
        return dict(value)

    profiles = {}
    for pname, p in spec.profiles.items():
        where = f"profiles.{pname}"
        if pname == PAPER_PROFILE or slugify(pname) != pname:
            raise _err(path, f"profile name {pname!r} is reserved or not a slug")
        pgrid = _check_grid(path, f"{where}.grid", p.grid)
        for k in pgrid:
            if k not in grid and len(pgrid[k]) > 1 and k != SEED_KEY:
                raise _err(path, f"{where}.grid.{k}: a profile may only narrow the table's grid keys")
        if by is not None and by in pgrid:
            extra = [v for v in pgrid[by] if v not in grid[by]]
            if extra:
                raise _err(path, f"{where}.grid.{by}: {extra} are not columns of the table ({grid[by]})")
        prow = None
        if p.rows is not None:
            prow = {}
            for i, r in enumerate(p.rows):
                if r.label not in known:
                    raise _err(path, f"{where}.rows[{i}]: no row labelled {r.label!r} in rows")
                prow[r.label] = _check_overrides(path, f"{where}.rows[{i}].overrides", r.overrides)
        profiles[pname] = Profile(
            base=None if p.base is None else _check_overrides(path, f"{where}.base", p.base),
            overrides=_check_overrides(path, f"{where}.overrides", p.overrides), grid=pgrid, rows=prow,
            paired=paired(f"{where}.paired", p.paired, set(prow) if prow is not None else known), budget=p.budget,
        )  # fmt: skip
    sweep = Sweep(
        path=path, name=spec.name, paper=spec.paper, title=spec.title, methods=tuple(spec.methods), base=base,
        grid=grid, rows=rows, columns_by=by, column_labels=labels, mean=cols.mean, metrics=list(metrics),
        source=spec.source, dataset=spec.dataset, budget=spec.budget, plot=spec.plot.model_dump() if spec.plot else None,
        profiles=profiles, note=_note(spec.notes), paired=paired("paired", spec.paired, known) or {},
    )  # fmt: skip
    for prof in [None, *profiles]:  # two runs in one directory: rows or grid values that slug alike
        dirs = [r.run_dir for r in sweep.expand(prof, "") if not r.shared]
        if len(set(dirs)) != len(dirs):
            dup = next(d for d in dirs if dirs.count(d) > 1)
            raise _err(path, f"two runs share the run directory {dup}; make row labels / grid values distinct")
    return sweep


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

    from fsseg.resolvers import register_resolvers, stage1_deferred

    register_resolvers()
    out: list = []
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"), stage1_deferred():
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
