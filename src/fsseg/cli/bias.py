"""fsseg-bias: does a trained model miss the novel objects it was trained to call background?

    fsseg-bias apanet-table4 --profile folds --rows "n = 0 (baseline)" "n = 3"
    -> outputs/sweeps/apanet-table4/folds/bias.md (and bias.csv; per run <run_dir>/bias/<split>-<subset>/)

APANet's and CELP's premise: under PFENet's protocol (``data.train_filter=keep``) a training image that holds a
base class is a training query whose novel-class pixels are labelled background, so the decoder learns those
objects as background and later misses them. This command measures it on every finished run of a sweep: the
run's best checkpoint is scored on novel-class episodes (fixed manifests, the same for every run of a fold)
whose queries hold a qualifying base class (``data.eval_queries=with_base``) or none (``without_base``), on

- the training split: with-base queries are the images training used (their novel objects were trained as
  background, "seen"), without-base ones images it never used;
- the evaluation split: the same partition on images no run trained on - the control for how much harder
  with-base images (more objects, occlusion) are in themselves.

Bias = (train without − train with) − (eval without − eval with), a difference of differences: zero for a
model that treats the novel objects of its training images like any others. Per row: mean ± 95% CI (Student t)
over the finished (fold, seed) points, and the paired change of the bias against the first row. Supports come
from every image of the class in each manifest. Resumable: an evaluation whose metrics.json exists with the
requested episode count is not repeated.

``--base-control`` adds the same checkpoint's mIoU on *base*-class episodes of the evaluation split (column
**base**): a model that under-segments everything (an optimisation deficit, not a class-specific bias) loses
there as much as on novel classes, so a gap between two rows that is not specific to novel classes shows up here
as well.
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

SUBSETS = ("with_base", "without_base")
BIAS_DIR = "bias"
COLUMNS = ("test", "train-with_base", "train-without_base", "eval-with_base", "eval-without_base", "bias")
BASE_COLUMN = "base"  # --base-control: base-class episodes of the evaluation split


def evaluate_run(run_dir: Path, split: str, subset: str, episodes: int, seed: int, cached_only: bool = False,
                 classes: str = "novel") -> float | None:
    """mIoU of the run's best checkpoint on ``classes`` episodes whose queries are ``subset`` of ``split`` (cached
    under run_dir/bias/<split>-<subset>, or base-<split> for the base-class control); with ``cached_only``, None
    when that evaluation is not on disk yet."""
    from omegaconf import OmegaConf

    from fsseg.cli.evaluate import evaluate, load_run_config, resolve_checkpoint
    from fsseg.provenance import read_metrics

    out = run_dir / BIAS_DIR / (f"{split}-{subset}" if classes == "novel" else f"{classes}-{split}")
    rec = read_metrics(out)
    if rec is not None and rec.get("episodes") == episodes and _manifest_seed(out) in (None, seed):
        return float(rec["metrics"]["miou"])
    if cached_only:
        return None
    cfg = load_run_config(run_dir, {"data.eval_split": split, "data.eval_queries": subset, "data.eval_classes": classes,
                                    "data.eval_episodes": episodes, "data.eval_seed": seed})  # fmt: skip
    trainer = OmegaConf.merge(cfg.trainer, {"enable_progress_bar": False, "enable_model_summary": False})
    return float(evaluate(cfg, resolve_checkpoint(run_dir, "best"), trainer, out)["miou"])


def _manifest_seed(eval_dir: Path) -> int | None:
    """The episode seed of a recorded evaluation (from its manifest's name, ..._seed<N>_n<count>_...)."""
    import json
    import re

    try:
        name = Path(json.loads((eval_dir / "provenance.json").read_text())["manifest"]["path"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return None
    m = re.search(r"_seed(\d+)_n\d+_", name)
    return int(m.group(1)) if m else None


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
    ap.add_argument("--base-control", action="store_true",
                    help="also score each run on base-class episodes of its evaluation split (column base)")
    ap.add_argument("--cached-only", action="store_true",
                    help="evaluate nothing: tabulate the runs whose four evaluations are already on disk")
    args = ap.parse_args(argv)
    from fsseg.cli.common import environment_defaults
    from fsseg.cli.table import collect
    from fsseg.provenance import _write_text_atomic
    from fsseg.resolvers import register_resolvers
    from fsseg.sweeps import find_sweep, load_sweep, recorded_config

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
    # (row, point) -> {column: value}
    table: dict[str, dict[tuple, dict[str, float]]] = {label: {} for label in wanted}
    unscored: list[str] = []
    # seed-major, then the other grid values, then the rows: an interrupted call has compared rows on the same points
    done.sort(key=lambda r: (str(r.run.seed), sorted((str(a), str(b)) for a, b in r.run.point.items())))
    for k, r in enumerate(done, 1):
        eval_split = (recorded_config(r.run.run_dir) or {}).get("data", {}).get("eval_split", "val")
        vals = {"test": float(r.metrics["miou"])}
        try:
            for split, side in (("train", "train"), (eval_split, "eval")):
                for subset in SUBSETS:
                    vals[f"{side}-{subset}"] = evaluate_run(r.run.run_dir, split, subset, args.episodes,
                                                            args.eval_seed, cached_only=args.cached_only)  # fmt: skip
            if args.base_control:
                vals[BASE_COLUMN] = evaluate_run(r.run.run_dir, eval_split, "all", args.episodes, args.eval_seed,
                                                 cached_only=args.cached_only, classes="base")  # fmt: skip
        except ConfigError as exc:  # e.g. a record (fsseg-record) without this evaluation: the others go on
            unscored.append(f"{r.run.describe()}: {exc}")
            print(f"fsseg-bias: {unscored[-1]}", file=sys.stderr, flush=True)
            continue
        if any(v is None for v in vals.values()):
            continue
        vals["bias"] = (vals["train-without_base"] - vals["train-with_base"]) - (
            vals["eval-without_base"] - vals["eval-with_base"])  # fmt: skip
        point = tuple(sorted((str(a), str(b)) for a, b in r.run.point.items()))
        table[r.run.row.label][point] = vals
        print(f"[{k}/{len(done)}] {r.run.describe()}: " + "  ".join(f"{c} {100 * v:.1f}" for c, v in vals.items()),
              flush=True)  # fmt: skip

    base = table[wanted[0]]
    columns = COLUMNS + ((BASE_COLUMN,) if args.base_control else ())
    lines = [
        f"# {sweep.name} [{profile or 'paper'}]: novel objects trained as background",
        "",
        ("Novel mIoU (%) of each run's best checkpoint on novel-class episodes whose queries hold a base class "
        "(**+base**) or none (**−base**), on the training split (with +base queries the images training used, their "
        "novel objects labelled background) and on the evaluation split (no run trained on them: the control). "
        "**bias** = (train −base − train +base) − (eval −base − eval +base). "
        f"{args.episodes} episodes per manifest, seed {args.eval_seed}; **test**: the sweep's test mIoU. "
        "Mean ± 95% CI over the finished (fold, seed) points; "
        f"Δ bias: paired change against the first row ({wanted[0]}) on the points both finished."
        + (" **base**: base-class episodes of the evaluation split (the control for a deficit on every class)."
           if args.base_control else "")),
        "",
        "| row | points | test | train +base | train −base | eval +base | eval −base | bias | Δ bias vs first row |"
        + (" base |" if args.base_control else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.base_control else ""),
    ]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["row", "point", *columns])
    for label in wanted:
        pts = table[label]
        stats = [_stats([v[c] for v in pts.values()]) for c in COLUMNS]
        paired = [v["bias"] - base[p]["bias"] for p, v in pts.items() if p in base]
        delta = "—" if label == wanted[0] else _stats(paired)
        control = f" {_stats([v[BASE_COLUMN] for v in pts.values()])} |" if args.base_control else ""
        lines.append(f"| {label} | {len(pts)} | " + " | ".join(stats) + f" | {delta} |{control}")
        for p, v in pts.items():
            w.writerow([label, ";".join(f"{a}={b}" for a, b in p), *(v[c] for c in columns)])
    root = sweep.root(profile, args.out)
    root.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(root / "bias.md", "\n".join(lines) + "\n")
    _write_text_atomic(root / "bias.csv", buf.getvalue())
    print("\n".join(lines))
    print(f"written: {root / 'bias.md'}, {root / 'bias.csv'}")
    if unscored:
        print(f"fsseg-bias: {len(unscored)} finished run(s) could not be scored:\n  " + "\n  ".join(unscored),
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
