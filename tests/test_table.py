"""fsseg-table / fsseg-dashboard on fabricated run directories: the paper's layout, mean ± 95% CI over seeds,
the paper's numbers and the difference, manifests and episode counts, failed runs marked, CSV, plot."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import yaml

from fsseg.provenance import write_json_atomic
from fsseg.sweeps import load_sweep


def _sweep(tmp_path: Path, **changes) -> Path:
    doc = {
        "name": "demo-table2", "paper": "demo", "title": "Demo; mIoU (%)", "source": "Demo paper, Table II",
        "metric": "miou", "methods": ["pfenet"], "base": ["experiment=pfenet_effl0_synth"],
        "grid": {"data.fold": [0, 1], "seed": [0, 1, 2]},
        "columns": {"by": "data.fold", "labels": ["Fold-0", "Fold-1"], "mean": True},
        "rows": [
            {"label": "k = 1", "overrides": ["head.reduce_dim=16"], "paper": {"Fold-0": 60.0, "Fold-1": 70.0, "Mean": 65.0}},
            {"label": "k = 2", "overrides": ["head.reduce_dim=32"], "paper": {"Fold-0": 61.0, "Fold-1": None, "Mean": None}},
        ],
        "plot": {"x": "head.reduce_dim", "label": "reduce dim"},
        "profiles": {"small": {"grid": {"data.fold": [0], "seed": [0]}}},
    }  # fmt: skip
    doc.update(changes)
    path = tmp_path / "sweeps" / "demo" / "table2.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _finish(run_dir: Path, miou: float, manifest: str = "f0" * 32, episodes: int = 300, **metrics) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "metrics.json", {"schema": 1, "metrics": {"miou": miou, "fbiou": 0.7, **metrics},
                                                 "manifest_hash": manifest, "episodes": episodes})  # fmt: skip


VALUES = {  # (row slug, fold) -> mIoU per seed
    ("k-1", 0): [0.40, 0.42, 0.44], ("k-1", 1): [0.50, 0.50, 0.53],
    ("k-2", 0): [0.45, 0.47, 0.49], ("k-2", 1): [0.55, None, 0.57],   # seed 1 of k=2 fold 1 failed
}  # fmt: skip


@pytest.fixture
def rendered(tmp_path):
    from fsseg.cli.table import render

    sweep = load_sweep(_sweep(tmp_path))
    out = tmp_path / "out"
    for run in sweep.expand(None, out):
        v = VALUES[(run.row.slug, run.point["data.fold"])][run.seed]
        if v is None:
            run.run_dir.mkdir(parents=True)
            (run.run_dir / "FAILED").write_text("exit code 1\nerror: RuntimeError: CUDA out of memory\n")
        else:
            _finish(run.run_dir, v, manifest=f"{run.point['data.fold']:02d}" * 32)
    return sweep, out, render(sweep, None, out)


def test_markdown_layout_ci_paper_and_difference(rendered):
    from scipy import stats

    _, out, paths = rendered
    assert paths["md"] == out / "demo-table2" / "paper" / "table.md"
    md = paths["md"].read_text()
    assert "| reduce dim | Fold-0 | Fold-0 paper | Δ | Fold-1 | Fold-1 paper | Δ | Mean | Mean paper | Δ |" in md
    vals = [40.0, 42.0, 44.0]
    ci = stats.t.ppf(0.975, 2) * 2.0 / math.sqrt(3)  # std of 40/42/44 is 2
    assert f"| k = 1 | 42.0 ± {ci:.1f} | 60.0 | -18.0 |" in md, md
    # mean column: per seed mean over folds (45, 46, 48.5), then over seeds
    per_seed = [(40 + 50) / 2, (42 + 50) / 2, (44 + 53) / 2]
    assert f"{sum(per_seed) / 3:.1f} ± " in md and "| 65.0 |" in md
    # the failed run: the cell keeps the two finished seeds and says one failed; Mean only over complete seeds
    assert "56.0 ± " in md and "(1 failed)" in md
    assert "Failed runs:" in md and "RuntimeError: CUDA out of memory" in md
    assert sum(vals) / 3 == 42.0
    # manifests: one line per fold and seed, hash and episode count
    assert "- data.fold=0, seed=0: `0000000000000000` (300 episodes)" in md
    assert "- data.fold=1, seed=2: `0101010101010101` (300 episodes)" in md
    assert "Runs: 11 finished, 1 failed, 0 not finished, of 12." in md


def test_paired_differences_against_the_first_row(rendered):
    from scipy import stats

    _, _, paths = rendered
    md = paths["md"].read_text()
    # k = 2 minus k = 1 at the 5 points both finished (fold 1 seed 1 of k = 2 failed): 5, 5, 5, 5, 4
    d = [5.0, 5.0, 5.0, 5.0, 4.0]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    ci = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)
    assert "Paired differences against k = 1:" in md
    assert f"| k = 2 | +{mean:.1f} ± {ci:.1f} | 5 | 5 of 5 |" in md, md


def test_paired_names_each_rows_baseline(tmp_path):
    """`paired:` pairs rows with baselines other than the first (CELP on CyCTR against CyCTR): each difference is
    over that baseline's runs, and the table names the baseline per row."""
    from fsseg.cli.table import render

    rows = [{"label": lab, "overrides": [f"head.reduce_dim={d}"]} for lab, d in
            (("A", 16), ("A+x", 24), ("B", 32), ("B+x", 48))]  # fmt: skip
    sweep = load_sweep(_sweep(tmp_path, rows=rows, plot=None, paired={"A+x": "A", "B+x": "B"}))
    assert [(r.label, b.label) for r, b in sweep.pairs()] == [("A+x", "A"), ("B+x", "B")]
    vals = {"A": [0.40, 0.42, 0.44], "A+x": [0.41, 0.45, 0.44], "B": [0.60, 0.60, 0.62], "B+x": [0.58, 0.59, 0.61]}
    out = tmp_path / "out"
    for run in sweep.expand(None, out):
        _finish(run.run_dir, vals[run.row.label][run.seed] + 0.01 * run.point["data.fold"])
    md = render(sweep, None, out)["md"].read_text()
    # per (fold, seed): A+x - A = +1, +3, 0 (both folds); B+x - B = -2, -1, -1
    assert "| row | baseline | Δ | points | row ahead |" in md, md
    assert "| A+x | A | +1.3 ± " in md and "| 6 | 4 of 6 |" in md, md
    assert "| B+x | B | -1.3 ± " in md and "| 6 | 0 of 6 |" in md, md


def test_paired_differences_in_every_metric(tmp_path):
    """With several metrics (mIoU, fp_rate), each gets its paired differences: the first says which row is ahead,
    an error rate only which is higher, in its own units (fractions, 4 decimals)."""
    from fsseg.cli.table import render

    sweep = load_sweep(_sweep(tmp_path, plot=None, metric=None, metrics=["miou", "fp_rate"]))
    out = tmp_path / "out"
    for run in sweep.expand(None, out):
        k2 = run.row.label == "k = 2"
        _finish(run.run_dir, 0.40 + 0.01 * run.seed + 0.02 * k2, fp_rate=0.050 + 0.010 * k2 + 0.001 * run.seed * k2)
    md = render(sweep, None, out)["md"].read_text()
    assert "| k = 2 | +2.0 ± 0.0 | 6 | 6 of 6 |" in md, md  # the same +2 at every point
    # fp_rate: k = 2 minus k = 1 = 0.010, 0.011, 0.012 per seed (both folds)
    d = [0.010, 0.011, 0.012] * 2
    ci = stats_t_ci(d)
    assert "Paired differences in FP rate against k = 1: FP rate of the row minus" in md, md
    assert "| row | Δ | points | row higher |" in md, md
    assert f"| k = 2 | +0.0110 ± {ci:.4f} | 6 | 6 of 6 |" in md, md


def stats_t_ci(d: list[float]) -> float:
    from scipy import stats

    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))


@pytest.mark.parametrize(
    "paired, message",
    [({"k = 2": "k = 3"}, "no row labelled 'k = 3'"), ({"k = 2": "k = 2"}, "paired with itself"),
     (["k = 2", "k = 1"], "must be a mapping")],
)  # fmt: skip
def test_paired_refuses_unknown_rows(tmp_path, paired, message):
    from fsseg.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_sweep(_sweep(tmp_path, paired=paired))
    with pytest.raises(ConfigError, match="profiles.small.paired"):
        load_sweep(_sweep(tmp_path, profiles={"small": {"grid": {"seed": [0]}, "paired": paired}}))


def test_csv_and_runs_csv(rendered):
    _, _, paths = rendered
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["row"] for r in rows] == ["k = 1", "k = 2"]
    assert float(rows[0]["Fold-0"]) == pytest.approx(42.0) and rows[0]["Fold-0 n"] == "3"
    assert float(rows[0]["Fold-0 diff"]) == pytest.approx(-18.0) and rows[0]["Fold-0 paper"] == "60.0000"
    assert rows[1]["Fold-1 status"] == "partial" and rows[1]["Fold-1 paper"] == ""
    runs = list(csv.DictReader(io.StringIO(paths["runs"].read_text())))
    assert len(runs) == 12 and sum(r["status"] == "failed" for r in runs) == 1
    assert {r["episodes"] for r in runs if r["status"] == "finished"} == {"300"}


def test_plot_written(rendered):
    _, _, paths = rendered
    png = paths["png"]
    assert png.name == "table.png" and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_subset_and_pending(tmp_path):
    from fsseg.cli.table import render

    sweep = load_sweep(_sweep(tmp_path))
    out = tmp_path / "out"
    runs = sweep.expand("small", out)
    _finish(runs[0].run_dir, 0.3)  # k=1 done, k=2 not run yet
    md = render(sweep, "small", out)["md"].read_text()
    assert "Profile: **small**" in md and "no Mean column is shown" in md
    assert "| k = 1 | 30.0 | 60.0 | -30.0 |" in md and "| k = 2 | … | 61.0 | — |" in md
    assert "1 not finished" in md


def test_table_cli_and_all(tmp_path, rendered, monkeypatch, capsys):
    from fsseg.cli.table import main

    sweep, out, _ = rendered
    monkeypatch.setenv("FSSEG_SWEEPS", str(sweep.path.parent.parent))
    assert main([str(sweep.path), "--out", str(out), "--quiet"]) == 0
    assert main(["--all", "--out", str(out), "--quiet"]) == 0
    assert "demo-table2 [paper]" in capsys.readouterr().out
    assert main(["no-such-table9", "--out", str(out)]) == 2


def test_dashboard_offline_renders_locally(rendered, monkeypatch, capsys):
    from fsseg.cli.dashboard import main

    sweep, out, _ = rendered
    run_dir = sweep.expand(None, out)[0].run_dir
    (run_dir / "qualitative").mkdir()
    (run_dir / "qualitative" / "test_panels.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main([str(sweep.path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wandb offline" in captured.err and "wandb sync" in captured.err
    html = (out / "demo-table2" / "paper" / "dashboard.html").read_text()
    assert "<table>" in html and "k = 1" in html and "table.png" in html
    assert "k-1/data.fold-0_seed-0/qualitative/test_panels.png" in html


def test_dashboard_online_without_report_api_falls_back(rendered, monkeypatch, capsys):
    import fsseg.cli.dashboard as dash

    sweep, out, _ = rendered
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(dash, "report_api", lambda: None)
    monkeypatch.setattr(dash, "_online", lambda: True)  # a key and a reachable host (no network here)
    assert dash.main([str(sweep.path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "report API (package wandb-workspaces) is not installed" in err and "falling back" in err


def test_dashboard_online_builds_the_wandb_report(rendered, monkeypatch, capsys):
    """With the report API installed (wandb-workspaces, a dev dependency) the online path builds a real report
    object: the rendered table as Markdown, a panel grid over this table's runs (filtered on sweep_name) with the
    four comparison panels. Only ``save`` (the upload) is replaced."""
    import fsseg.cli.dashboard as dash

    wr = dash.report_api()
    assert wr is not None, "wandb-workspaces (dev extra) is not installed"
    saved = []
    monkeypatch.setattr(wr.Report, "save", lambda self, *a, **k: saved.append(self) or self)
    monkeypatch.setattr(wr.Report, "url", property(lambda self: "https://wandb.ai/team/fsseg/reports/demo"))
    sweep, out, _ = rendered
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(dash, "_online", lambda: True)
    assert dash.main([str(sweep.path), "--out", str(out), "--entity", "team"]) == 0
    captured = capsys.readouterr()
    assert "wandb report: https://wandb.ai/team/fsseg/reports/demo" in captured.out
    assert "skipped a panel" not in captured.err and "could not create" not in captured.err
    (report,) = saved
    assert report.project == "fsseg" and report.entity == "team" and report.title.startswith("demo-table2")
    markdown, grid = report.blocks
    assert "k = 1" in markdown.text and "Fold-0" in markdown.text
    (runset,) = grid.runsets
    assert "demo-table2" in str(runset.filters) and runset.project == "fsseg"
    assert len(grid.panels) == 4
    assert (out / "demo-table2" / "paper" / "dashboard.html").is_file()  # the local comparison is written too


def test_table_names_its_command_and_the_git_shas_of_its_cells(tmp_path):
    """A rendered table says which command made it and which commit(s) each finished run's code came from."""
    from fsseg.cli.table import render

    sweep = load_sweep(_sweep(tmp_path))
    out = tmp_path / "out"
    runs = sweep.expand("small", out)
    for run, sha in zip(runs, ["a" * 40, "b" * 40]):
        _finish(run.run_dir, 0.3)
        write_json_atomic(run.run_dir / "provenance.json", {"git": {"sha": sha, "dirty": False}})
    md = render(sweep, "small", out)["md"].read_text()
    assert "Command: `fsseg-sweep demo-table2 --profile small` (`make reproduce-demo-table2 PROFILE=small`)." in md
    assert "Code: git `aaaaaaaaaaaa` (1 run), git `bbbbbbbbbbbb` (1 run)." in md
    runs_csv = list(csv.DictReader(io.StringIO((out / "demo-table2" / "small" / "runs.csv").read_text())))
    assert [r["git_sha"] for r in runs_csv] == ["a" * 40, "b" * 40]


def test_runs_csv_lists_every_scalar_metric_a_run_records(tmp_path):
    """runs.csv keeps the four headline columns first, then any other scalar (here a meta learner's rate); runs
    without it leave the cell empty, and non-scalars (per-class lists) stay out."""
    from fsseg.cli.table import render

    sweep = load_sweep(_sweep(tmp_path))
    out = tmp_path / "out"
    a, b = sweep.expand("small", out)[:2]
    _finish(a.run_dir, 0.3, fp_rate_meta=0.048, class_iou=[0.1, 0.2])
    _finish(b.run_dir, 0.4)
    rows = list(csv.DictReader(io.StringIO(render(sweep, "small", out)["runs"].read_text())))
    header = list(rows[0])
    assert header[header.index("status") + 1:header.index("status") + 6] == \
        ["miou", "fbiou", "fp_rate", "fn_rate", "fp_rate_meta"]  # fmt: skip
    assert "class_iou" not in header
    assert [r["fp_rate_meta"] for r in rows] == ["0.048", ""]


def test_a_metric_suffix_row_reads_the_meta_learner_of_the_same_runs(tmp_path):
    """A row with the overrides of another and `metric_suffix: _meta` shares its run directories (trained once)
    and reads miou_meta / fp_rate_meta; paired against it, it gives meta - final on the same runs."""
    from fsseg.cli.table import build_table, collect, paired_differences

    rows = [{"label": "BAM", "overrides": ["head.reduce_dim=16"]},
            {"label": "BAM meta learner", "overrides": ["head.reduce_dim=16"], "metric_suffix": "_meta"}]  # fmt: skip
    sweep = load_sweep(_sweep(tmp_path, rows=rows, metrics=["miou", "fp_rate"], metric=None,
                              paired={"BAM meta learner": "BAM"}, plot=None))  # fmt: skip
    out = tmp_path / "out"
    runs = sweep.expand(None, out)
    final, meta = [r for r in runs if r.row.label == "BAM"], [r for r in runs if r.row.label == "BAM meta learner"]
    assert len(final) == len(meta) == 6 and all(m.shared and m.run_dir == f.run_dir for f, m in zip(final, meta))
    finals = {}
    for i, r in enumerate(final):  # meta learner: 2 points lower mIoU, 0.01 more false positives
        finals[i] = (0.40 + 0.01 * i, 0.05 + 0.001 * i)
        _finish(r.run_dir, finals[i][0], fp_rate=finals[i][1], miou_meta=finals[i][0] - 0.02,
                fp_rate_meta=finals[i][1] + 0.01)  # fmt: skip
    results = collect(sweep, None, out)
    t = build_table(sweep, None, results, "miou")
    fold0 = [finals[i][0] for i, r in enumerate(final) if r.point["data.fold"] == 0]
    assert t["rows"]["BAM"]["Fold-0"].mean == pytest.approx(100 * sum(fold0) / 3)
    assert t["rows"]["BAM meta learner"]["Fold-0"].mean == pytest.approx(100 * sum(fold0) / 3 - 2.0)
    (d,) = paired_differences(sweep, None, results, "miou")
    assert d["row"] == "BAM meta learner" and d["mean"] == pytest.approx(-2.0) and d["n"] == 6 and d["wins"] == 0
    (d,) = paired_differences(sweep, None, results, "fp_rate")
    assert d["mean"] == pytest.approx(0.01) and d["wins"] == 6
    from fsseg.cli.table import render

    md = render(sweep, None, out)["md"].read_text()
    assert "Runs: 6 finished, 0 failed, 0 not finished, of 6 (+6 read again by a row sharing them)." in md


def test_metric_suffix_must_be_a_suffix(tmp_path):
    from fsseg.errors import ConfigError

    rows = [{"label": "a", "overrides": []}, {"label": "b", "overrides": [], "metric_suffix": "meta"}]
    with pytest.raises(ConfigError, match=r"rows\[1\]\.metric_suffix: 'meta' is not a metric-name suffix"):
        load_sweep(_sweep(tmp_path, rows=rows, plot=None))
