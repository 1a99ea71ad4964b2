"""fsseg-dashboard: the comparison dashboard of one paper table - methods/rows side by side, ours beside the paper.

    fsseg-dashboard apanet-table4 --profile embedded     # offline: outputs/sweeps/apanet-table4/embedded/dashboard.html
    WANDB_API_KEY=... fsseg-dashboard apanet-table4 --project fsseg --entity my-team     # + a wandb report

Online (a wandb key, WANDB_MODE not offline/disabled, and the report API package ``wandb-workspaces``
installed): creates a wandb report for the table: the Markdown table (ours vs the paper), and panels over
the table's runs (filtered by ``config.sweep_name``, i.e. the group): test mIoU / FB-IoU per row value,
training loss curves and the qualitative prediction panels. Without the report API it says so and falls
back to the local dashboard. Offline it renders the same comparison locally: fsseg-table's table.{md,csv,png}
plus ``dashboard.html`` (the table, the plot and each row's qualitative panel from its run directory).
Offline wandb runs can be uploaded first with ``wandb sync <run dir>/wandb/offline-run-*``.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.errors import ConfigError
from fsseg.io import write_text_atomic
from fsseg.sweeps import Sweep, find_sweep, load_sweep

__all__ = ["local_dashboard", "main", "report_api", "wandb_report"]


def report_api():
    """The wandb report module (wandb_workspaces.reports.v2), or None when the package is not installed."""
    try:
        import wandb_workspaces.reports.v2 as wr  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - ImportError, or a broken install
        return None
    return wr


def _online() -> bool:
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:  # `wandb login` stores the key in ~/.netrc
        import netrc

        host = (os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except Exception:  # noqa: BLE001
        return False


def local_dashboard(sweep: Sweep, profile: str | None, out: str | os.PathLike) -> Path:
    """fsseg-table's files plus dashboard.html (table, plot, qualitative panels of every row)."""
    from fsseg.cli.table import _fmt, build_table, collect, render

    paths = render(sweep, profile, out)
    root = paths["md"].parent
    results = collect(sweep, profile, out)
    table = build_table(sweep, profile, results, sweep.metrics[0])
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{esc(sweep.name)}</title>",
        ("<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        ".failed{color:#b00;font-weight:bold}.paper{color:#666}img{max-width:100%}</style>"),
        f"<h1>{esc(sweep.name)}: {esc(sweep.title)}</h1>",
        (f"<p>{esc(sweep.source)} &mdash; profile <b>{esc(results[0].run.profile if results else 'paper')}</b>. "
        "Ours: mean &plusmn; 95% CI over seeds; paper as printed; &Delta; = ours &minus; paper.</p>"),
        "<table><tr><th>row</th>" + "".join(f"<th>{esc(c)}</th><th class='paper'>paper</th><th>&Delta;</th>"
                                             for c in table["columns"]) + "</tr>",
    ]  # fmt: skip
    for label, cells in table["rows"].items():
        tds = []
        for c in table["columns"]:
            cell = cells[c]
            cls = " class='failed'" if cell.status == "failed" else ""
            paper, diff = _fmt(cell.paper), _fmt(cell.diff, signed=True)
            tds.append(f"<td{cls}>{esc(cell.text())}</td><td class='paper'>{paper}</td><td>{diff}</td>")
        parts.append(f"<tr><td>{esc(label)}</td>{''.join(tds)}</tr>")
    parts.append("</table>")
    if "png" in paths:
        parts.append(f"<h2>Plot</h2><img src='{paths['png'].name}' alt='plot'>")
    parts.append("<h2>Qualitative predictions (support | query | ground truth | prediction)</h2>")
    for row in sweep.rows_run(profile):
        for r in results:
            if r.run.row.label != row.label:
                continue
            img = r.run.run_dir / "qualitative" / "test_panels.png"
            if img.is_file():
                rel = os.path.relpath(img, root)
                parts.append(f"<h3>{esc(r.run.describe())}</h3><img src='{esc(rel)}' alt='panels'>")
                break
    parts.append(f"<p>Files: {', '.join(esc(p.name) for p in paths.values())}; runs: runs.csv.</p>")
    dest = root / "dashboard.html"
    write_text_atomic(dest, "\n".join(parts) + "\n")
    return dest


def wandb_report(sweep: Sweep, profile: str | None, out, project: str, entity: str | None) -> str:
    """Create the wandb report of the table; returns its URL. Raises if the report API is missing."""
    wr = report_api()
    if wr is None:
        raise ImportError("the wandb report API is not installed (pip install wandb-workspaces)")
    from fsseg.cli.table import render

    md = render(sweep, profile, out)["md"].read_text()
    runset = wr.Runset(entity=entity or "", project=project, name=sweep.name,
                       filters=f"Config('sweep_name') = '{sweep.name}'")  # fmt: skip
    x = sweep.plot["x"] if sweep.plot else "method_name"
    panels = []
    for make in (
        lambda: wr.BarPlot(title=f"test mIoU by {x}", metrics=["test/miou"], groupby=f"config.{x}"),
        lambda: wr.BarPlot(title=f"test FB-IoU by {x}", metrics=["test/fbiou"], groupby=f"config.{x}"),
        lambda: wr.LinePlot(title="training loss", x="trainer/global_step", y=["train/loss"]),
        lambda: wr.MediaBrowser(media_keys=["test/qualitative"]),
    ):
        try:
            panels.append(make())
        except Exception as exc:  # noqa: BLE001 - a panel type missing from this API version
            print(f"fsseg-dashboard: skipped a panel ({type(exc).__name__}: {exc})", file=sys.stderr)
    report = wr.Report(
        project=project, entity=entity or "", title=f"{sweep.name}: {sweep.title}",
        description=f"{sweep.source}; generated by fsseg-dashboard from {sweep.path.name}",
        blocks=[wr.MarkdownBlock(text=md), wr.PanelGrid(runsets=[runset], panels=panels)],
    )  # fmt: skip
    report.save()
    return str(report.url)


def main(argv: Sequence[str] | None = None) -> int:
    from fsseg.cli.common import environment_defaults

    environment_defaults()
    ap = argparse.ArgumentParser(prog="fsseg-dashboard", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("sweep", help="sweep name (apanet-table4) or file")
    ap.add_argument("--profile", default="", help="profile (e.g. embedded); empty = the paper's protocol")
    ap.add_argument("--out", default=os.environ.get("FSSEG_SWEEP_OUT", "outputs/sweeps"), help="sweep output root")
    ap.add_argument("--project", default=os.environ.get("WANDB_PROJECT", "fsseg"), help="wandb project (conf/logger/wandb.yaml: fsseg)")
    ap.add_argument("--entity", default=os.environ.get("WANDB_ENTITY"), help="wandb entity (team or user)")
    ap.add_argument("--local", action="store_true", help="only the local dashboard, even with a wandb key")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(find_sweep(args.sweep))
        profile = args.profile or None
        if _online() and not args.local:
            if report_api() is None:
                print("fsseg-dashboard: wandb is online but its report API (package wandb-workspaces) is not "
                      "installed; falling back to the local dashboard (pip install wandb-workspaces for a wandb "
                      "report)", file=sys.stderr)  # fmt: skip
            else:
                try:
                    print(f"wandb report: {wandb_report(sweep, profile, args.out, args.project, args.entity)}")
                except Exception as exc:  # noqa: BLE001 - network/auth problems: the local dashboard still works
                    print(f"fsseg-dashboard: could not create the wandb report ({type(exc).__name__}: {exc}); "
                          "falling back to the local dashboard", file=sys.stderr)  # fmt: skip
        else:
            print("fsseg-dashboard: wandb offline (no key, or WANDB_MODE offline/disabled): local dashboard; "
                  "upload offline runs with `wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr)  # fmt: skip
        dest = local_dashboard(sweep, profile, args.out)
    except ConfigError as exc:
        print(f"fsseg-dashboard: {exc}", file=sys.stderr)
        return 2
    print((dest.parent / "table.md").read_text())
    print(f"dashboard: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
