"""Evaluation cost of BAM relative to PFENet on the same episodes (issue 16): the base learner and the ensemble
on top of a PFENet-style meta learner, the encoder included.

    fsseg-bench bam                      # embedded size (efficientnet-lite0, 128 px) and 473 px / ResNet-50 shapes
    fsseg-bench bam --skip-473 --repeats 7

Both models are built from the configs (`method=pfenet recipe=synth` vs `method=bam recipe=bam_synth`, and
`recipe=pascal` vs `recipe=bam_pascal` with ResNet-50 at 473 px) with random weights; BAM's base learner is a
random `BaseLearner` of the fold's shape (no stage-1 file needed). BAM's encoder runs to its deepest tap (the
base learner's input: efficientnet-lite0's last stage, ResNet's layer4 as PFENet's prior already does), which is
part of its cost. Times: `torch.utils.benchmark` medians of interleaved rounds; FLOPs beside them.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from fsseg.bench._timing import count_flops, describe, interleaved, parser


def _model(overrides: list[str], tmp: Path):
    from hydra import compose, initialize_config_dir

    from fsseg.cli.common import config_dir, instantiate
    from fsseg.models.bam import BaseLearner
    from fsseg.models.base_learner import write_artifact

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "encoder.weights=none"])
        if "base_learner_path" in cfg:  # a random stage-1 file of the right shape
            encoder = instantiate(cfg.encoder)
            learner = BaseLearner(encoder.tap_channels["base"], 15, list(range(6, 21)))
            meta = {"fold": 0, "encoder": encoder.name, "tap": "base", "in_dim": learner.in_dim,
                    "base_class_ids": list(range(6, 21)), "bins": [1, 2, 3, 6]}  # fmt: skip
            state = {f"head.{k}": v for k, v in learner.state_dict().items()}
            domain_tap = cfg.get("base_task", {}).get("domain_tap")
            if domain_tap:  # I2R's stage-1 domain classifier (recipe i2r_synth)
                meta["domain_tap"] = domain_tap
                c = encoder.tap_channels[domain_tap]
                state.update({"domain.weight": torch.randn(15, c) / c**0.5, "domain.bias": torch.zeros(15)})
            path = write_artifact(tmp / f"{encoder.name}.pt", state, meta)
            cfg = compose("train", overrides=[*overrides, "encoder.weights=none", f"base_learner_path={path}"])
        torch.manual_seed(0)
        return instantiate(cfg.model, num_eval_classes=5).eval()


def _batch(b: int, size: int) -> dict[str, torch.Tensor]:
    from fsseg.data import batch as B

    g = torch.Generator().manual_seed(0)
    mask = lambda *s: (torch.rand(*s, generator=g) > 0.6).long()
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=g), B.SUPPORT_IMGS: torch.randn(b, 1, 3, size, size, generator=g),
        B.QUERY_MASK: mask(b, size, size), B.SUPPORT_MASKS: mask(b, 1, size, size), B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }  # fmt: skip


def run(name: str, pfenet: list[str], bam: list[str], batch: dict, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = {"PFENet": _model(pfenet, Path(tmp)), "BAM": _model(bam, Path(tmp))}
    steps = {k: (lambda m=m: m.predict(batch)) for k, m in models.items()}
    times = interleaved(steps, repeats)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    print(f"  {name}")
    for k in models:
        print(f"    eval {k:6s} {describe(times[k], flops[k])}")
    print(f"    BAM/PFENet evaluation: {times['BAM'] / times['PFENet']:.2f}x time, {flops['BAM'] / flops['PFENet']:.2f}x FLOPs")


def main(argv: list[str] | None = None) -> None:
    ap = parser("bam", __doc__)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"fsseg-bench bam: CPU, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        run("embedded (efficientnet-lite0, 128 px, batch 8, 1-shot)", ["method=pfenet", "recipe=synth"],
            ["method=bam", "recipe=bam_synth"], _batch(8, 128), args.repeats)  # fmt: skip
        if not args.skip_473:
            r50 = ["encoder=resnet50", "data.batch_size=1"]
            run("473 px / ResNet-50 (batch 1, 1-shot)", ["method=pfenet", "recipe=pascal", *r50],
                ["method=bam", "recipe=bam_pascal", *r50], _batch(1, 473), max(2, args.repeats // 2))  # fmt: skip


if __name__ == "__main__":
    main()
