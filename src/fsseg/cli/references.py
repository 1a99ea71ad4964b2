"""fsseg-references: reference numbers beside a trained run, on the same evaluation manifest.

    fsseg-references outputs/demo/pfenet_fold0 [--checkpoint best] [--figure PATH]

Reports, for the run's novel-class manifest: all-background and all-foreground predictions (how trivial is
the benchmark?), a training-free prototype baseline (cosine between query features and the support's
masked-average prototype; encoder tap and threshold tuned on base-class episodes of the evaluation split),
and the trained model's base-class mIoU beside its novel-class mIoU (the generalisation gap). Writes
references.json into the run directory and a qualitative PNG (support, query, ground truth, prediction).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fsseg.cli.common import environment_defaults
from fsseg.data import batch as B


@torch.no_grad()
def evaluate_loader(model, loader, num_classes: int, desc: str = "eval") -> dict[str, Any]:
    """Plain single-process evaluation loop (the segmenter's own scoring path)."""
    from fsseg.metrics import FewShotIoU

    metric = FewShotIoU(num_classes)
    model.eval()
    for batch in tqdm(loader, desc=desc, leave=False):
        logits, target = model.score_logits(batch, model.predict(batch))
        metric.update(logits, target, batch[B.CLASS_IDX])
    return metric.compute()


def constant_predictions(loader, num_classes: int, foreground: bool, resolution: str) -> dict[str, Any]:
    from fsseg.metrics import FewShotIoU

    metric = FewShotIoU(num_classes)
    for batch in loader:
        target = batch[B.QUERY_LABEL_ORI] if resolution == "original" else batch[B.QUERY_MASK]
        metric.update(torch.full_like(target, int(foreground)), target, batch[B.CLASS_IDX])
    return metric.compute()


def _summary(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("miou", "fbiou", "fp_rate", "fn_rate")}


def references(run_dir: Path, checkpoint: str = "best", tune_episodes: int = 300, figure: Path | None = None,
               thresholds: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    from fsseg import provenance
    from fsseg.cli.common import instantiate
    from fsseg.cli.evaluate import load_run_config, load_weights, resolve_checkpoint
    from fsseg.models.baselines import CosineThresholdDecoder, MaskedPrototypeHead, tune_threshold
    from fsseg.models.losses import CrossEntropy
    from fsseg.models.segmenter import FewShotSegmenter

    cfg = load_run_config(run_dir)
    thresholds = np.round(np.linspace(0.0, 0.95, 20), 3) if thresholds is None else thresholds
    novel = instantiate(cfg.data)
    novel.prepare_data()
    novel.setup("test")
    base = instantiate(cfg.data, eval_classes="base")
    base.setup("test")
    tune = instantiate(cfg.data, eval_classes="base", eval_episodes=tune_episodes, eval_seed=int(cfg.data.eval_seed) + 100)
    tune.setup("test")
    n_novel, n_base = novel.num_novel_classes, base.num_novel_classes
    resolution = cfg.model.eval_resolution

    model = instantiate(cfg.model, num_eval_classes=n_novel)
    load_weights(model, resolve_checkpoint(run_dir, checkpoint))
    out: dict[str, Any] = {"manifest_hash": novel.eval_manifest.hash, "episodes": len(novel.eval_manifest.episodes),
                           "base_manifest_hash": base.eval_manifest.hash}  # fmt: skip
    out["all_background"] = _summary(constant_predictions(novel.test_dataloader(), n_novel, False, resolution))
    out["all_foreground"] = _summary(constant_predictions(novel.test_dataloader(), n_novel, True, resolution))

    # training-free prototype baseline: tap and threshold chosen on base-class episodes
    best = None
    for tap in sorted(model.encoder.tap_channels):
        proto = FewShotSegmenter(model.encoder, MaskedPrototypeHead(model.encoder.tap_channels, tap),
                                 CosineThresholdDecoder(0.5), CrossEntropy(), num_eval_classes=n_base,
                                 eval_resolution=resolution)  # fmt: skip
        thr, scores = tune_threshold(proto, tune.test_dataloader(), list(thresholds), n_base)
        if best is None or max(scores) > best[2]:
            best = (tap, thr, max(scores))
    tap, thr, tuned = best
    proto = FewShotSegmenter(model.encoder, MaskedPrototypeHead(model.encoder.tap_channels, tap),
                             CosineThresholdDecoder(thr), CrossEntropy(), num_eval_classes=n_novel,
                             eval_resolution=resolution)  # fmt: skip
    out["prototype_baseline"] = {
        "tap": tap, "threshold": thr, "base_miou_tuning": tuned,
        **_summary(evaluate_loader(proto, novel.test_dataloader(), n_novel, "prototype baseline")),
    }  # fmt: skip
    model_novel = provenance.read_metrics(run_dir)
    out["model"] = {
        "novel": _summary(model_novel["metrics"]) if model_novel else
        _summary(evaluate_loader(model, novel.test_dataloader(), n_novel, "model (novel)")),
        "base": _summary(evaluate_loader(model, base.test_dataloader(), n_base, "model (base)")),
    }  # fmt: skip
    if figure is not None:
        from fsseg.viz import episode_panels, save_grid

        batch = next(iter(novel.test_dataloader()))
        rows, titles = episode_panels(batch, model.predict(batch), novel.eval_transform.mean, novel.eval_transform.std, limit=6,
                                      class_names=novel.class_names)  # fmt: skip
        k = batch[B.SUPPORT_IMGS].shape[1]
        cols = [f"support {i + 1}" for i in range(k)] + ["query", "ground truth", "prediction"]
        out["figure"] = str(save_grid(rows, titles, figure, cols))
    provenance.write_json_atomic(run_dir / "references.json", provenance.to_jsonable(out))
    return out


def format_table(ref: dict[str, Any], method: str) -> str:
    rows = [
        ("all-background", ref["all_background"], None),
        ("all-foreground", ref["all_foreground"], None),
        (f"training-free prototype ({ref['prototype_baseline']['tap']}, t={ref['prototype_baseline']['threshold']})",
         ref["prototype_baseline"], None),
        (f"{method} (trained)", ref["model"]["novel"], ref["model"]["base"]),
    ]  # fmt: skip
    lines = [f"{'':48s} {'novel mIoU':>10s} {'FB-IoU':>8s} {'base mIoU':>10s}"]
    for name, m, b in rows:
        base = f"{100 * b['miou']:10.2f}" if b else f"{'':>10s}"
        lines.append(f"{name:48s} {100 * m['miou']:10.2f} {100 * m['fbiou']:8.2f} {base}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    environment_defaults()
    ap = argparse.ArgumentParser(prog="fsseg-references", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--tune-episodes", type=int, default=200)
    ap.add_argument("--figure", type=Path, default=None, help="PNG path (default: RUN_DIR/qualitative.png)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    ref = references(args.run_dir, args.checkpoint, args.tune_episodes, args.figure or args.run_dir / "qualitative.png")
    from omegaconf import OmegaConf

    method = OmegaConf.load(args.run_dir / "config.yaml").get("method_name", "model")
    print(f"\nmanifest {ref['manifest_hash'][:12]} ({ref['episodes']} episodes), scored at the original resolution")
    print(format_table(ref, method))
    print(f"\nreferences: {args.run_dir / 'references.json'}\nfigure:     {ref.get('figure')}")


if __name__ == "__main__":
    main()
