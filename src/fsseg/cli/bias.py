"""fsseg-bias: does a trained model segment the novel objects it was trained to call background?

    fsseg-bias apanet-table4 --profile folds --rows "n = 0 (baseline)" "n = 3"
    -> outputs/sweeps/apanet-table4/folds/bias.md  (and bias.csv; per run: <run_dir>/bias/{seen,unseen}/)

APANet's and CELP's premise: under PFENet's protocol (``data.train_filter=keep``) a training image that holds a
base class is a training query whose novel-class pixels are labelled background, so the decoder learns those
objects as background and later misses them. This command tests that on every finished run of a sweep by
evaluating its best checkpoint on novel-class episodes whose queries are *training* images
(``data.eval_split=train``):

- ``seen``: training images that hold a qualifying base class (their novel objects were trained as background);
- ``unseen``: training images with no qualifying base class (never a training query or support).

Supports come from every training image of the class in both, and the episodes are fixed manifests (same
hash for every run of a fold), so rows are compared on the same episodes. ``unseen - seen`` is the bias
plus whatever makes seen images harder (they hold more objects); the second part is the same for every
method, so the quantity to compare between rows is the gap (and the paired change of ``seen`` against the
first row). Aggregates: mean ± 95% CI (Student t) over all finished (fold, seed) points of a row.
Resumable: a run whose bias/<queries>/metrics.json exists with the requested episode count is not
re-evaluated.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fsseg.errors import ConfigError

QUERIES = ("seen", "unseen")
BIAS_DIR = "bias"


def evaluate_run(run_dir: Path, queries: str, episodes: int, seed: int) -> float:
    """Novel mIoU of the run's best checkpoint on ``queries`` training images (cached under run_dir/bias)."""
    from omegaconf import OmegaConf

    from fsseg.cli.evaluate import evaluate, load_run_config, resolve_checkpoint
    from fsseg.provenance import read_metrics

    out = run_dir / BIAS_DIR / queries
    rec = read_metrics(out)
    if rec is not None and rec.get("episodes") == episodes:
        return float(rec["metrics"]["miou"])
    cfg = load_run_config(run_dir, {"data.eval_split": "train", "data.eval_queries": queries,
                                    "data.eval_episodes": episodes, "data.eval_seed": seed})  # fmt: skip
    trainer = OmegaConf.merge(cfg.trainer, {"enable_progress_bar": False, "enable_model_summary": False})
    return float(evaluate(cfg, resolve_checkpoint(run_dir, "best"), trainer, out)["miou"])


def _stats(values: Sequence[float]) -> str:
    from fsseg.metrics import aggregate_seeds

    if not values:
        return "…"
    a = aggregate_seeds([100 * v for v in values])
    ci = "" if math.isnan(a["ci95"]) else f" ± {a['ci95']:.1f}"
    return f"{a['mean']:.1f}{ci}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fsseg-bias", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("sweep", help="sweep name (apanet-table4) or file")
    ap.add_argument("--profile", default="", help="profile (e.g. folds); empty = the paper's protocol")
    ap.add_argument("--rows", nargs="*", default=None, help="row labels to evaluate (default: all rows)")
    ap.add_argument("--episodes", type=int, default=300, help="episodes per manifest (default 300)")
    ap.add_argument("--eval-seed", type=int, default=321, help="manifest seed (default 321)")
    ap.add_argument("--out", default=os.environ.get("FSSEG_SWEEP_OUT", "outputs/sweeps"), help="sweep output root")
    args = ap.parse_args(argv)
    from fsseg.cli.common import environment_defaults
    from fsseg.cli.table import collect
    from fsseg.provenance import _write_text_atomic
    from fsseg.resolvers import register_resolvers
    from fsseg.sweeps import find_sweep, load_sweep

    environment_defaults()
    register_resolvers()
    try:
        if args.episodes < 1:
            raise ConfigError(f"--episodes={args.episodes}: expected an integer >= 1")
        sweep = load_sweep(find_sweep(args.sweep))
        profile = args.profile or None
        labels = [r.label for r in sweep.rows_run(profile)]
        unknown = [r for r in args.rows or [] if r not in labels]
        if unknown:
            raise ConfigError(f"--rows {unknown}: not rows of {sweep.name}; its rows: {labels}")
        wanted = args.rows or labels
        results = [r for r in collect(sweep, profile, args.out) if r.run.row.label in wanted and not r.run.shared]
    except ConfigError as exc:
        print(f"fsseg-bias: {exc}", file=sys.stderr)
        return 2
    done = [r for r in results if r.status == "finished"]
    print(f"fsseg-bias {sweep.name} [{profile or 'paper'}]: {len(done)} finished runs of {len(results)}; "
          f"{args.episodes} episodes per manifest")  # fmt: skip
    # (row, point) -> {"test", "seen", "unseen"}
    table: dict[str, dict[tuple, dict[str, float]]] = {label: {} for label in wanted}
    for k, r in enumerate(done, 1):
        vals = {"test": float(r.metrics["miou"])}
        for q in QUERIES:
            vals[q] = evaluate_run(r.run.run_dir, q, args.episodes, args.eval_seed)
        point = tuple(sorted((str(a), str(b)) for a, b in r.run.point.items()))
        table[r.run.row.label][point] = vals
        print(f"[{k}/{len(done)}] {r.run.describe()}: test {100 * vals['test']:.1f}  seen "
              f"{100 * vals['seen']:.1f}  unseen {100 * vals['unseen']:.1f}", flush=True)  # fmt: skip

    base = table[wanted[0]]
    lines = [
        f"# {sweep.name} [{profile or 'paper'}]: novel objects trained as background",
        "",
        "Novel mIoU (%) of each run's best checkpoint on novel-class episodes whose queries are training images "
        "that training used (**seen**: their novel objects were labelled background) or never used (**unseen**); "
        f"{args.episodes} episodes per manifest, seed {args.eval_seed}. **test**: the sweep's own test mIoU "
        "(evaluation split). Mean ± 95% CI over the finished (fold, seed) points; "
        f"Δ seen: paired change of seen against the first row ({wanted[0]}) on the points both finished.",
        "",
        "| row | points | test | seen | unseen | unseen − seen | Δ seen vs first row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "point", "test", "seen", "unseen"])
    for label in wanted:
        pts = table[label]
        col = {q: [v[q] for v in pts.values()] for q in ("test", *QUERIES)}
        gap = [v["unseen"] - v["seen"] for v in pts.values()]
        paired = [v["seen"] - base[p]["seen"] for p, v in pts.items() if p in base]
        delta = "—" if label == wanted[0] else _stats(paired)
        lines.append(f"| {label} | {len(pts)} | {_stats(col['test'])} | {_stats(col['seen'])} | "
                     f"{_stats(col['unseen'])} | {_stats(gap)} | {delta} |")  # fmt: skip
        for p, v in pts.items():
            w.writerow([label, ";".join(f"{a}={b}" for a, b in p), v["test"], v["seen"], v["unseen"]])
    root = sweep.root(profile, args.out)
    root.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(root / "bias.md", "\n".join(lines) + "\n")
    _write_text_atomic(root / "bias.csv", buf.getvalue())
    print("\n".join(lines))
    print(f"written: {root / 'bias.md'}, {root / 'bias.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
