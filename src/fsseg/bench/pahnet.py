"""PAHNet's cost (issue 19, Performance; supplement Table 5): learnable parameters and FLOPs of HDMNet and SCCAN-Plus
with and without PAHNet, and the frozen predictor's cost relative to the host's training step.

    fsseg-bench pahnet --count-only                 # parameters and FLOPs, embedded size and 473 px / ResNet-50
    fsseg-bench pahnet --skip-473 --repeats 5       # + times: host training step vs the predictor's forward

Models are built from the configs (``method=hdmnet recipe=hdmnet_synth`` vs ``method=hdmnet_pahnet
recipe=hdmnet_pahnet_synth``, likewise SCCAN-Plus; ``*_pascal`` recipes with ResNet-50 at 473 px) with random
weights: a random stage-1 base learner of the fold's shape and a random SSP model (``method=ssp``, its recipe)
as the frozen predictor, so nothing needs training. FLOPs: `fsseg.cost.model_cost` (multiply-adds, the
papers' convention; the predictor's share apart). Times: `torch.utils.benchmark` medians of interleaved rounds
of one training step (forward + backward) of the host and one predictor forward (no_grad, as in training).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from fsseg.bench._timing import interleaved, parser
from fsseg.bench.bam import _model as _host_model
from fsseg.cost import episode_batch, model_cost

PAIRS = {
    "HDMNet": (["method=hdmnet"], ["method=hdmnet_pahnet"], "hdmnet"),
    "SCCAN-Plus": (["method=sccan_plus"], ["method=sccan_plus_pahnet"], "sccan_plus"),
}


def _predictor(encoder: list[str], recipe: str, output_size):
    """A random SSP model (method=ssp, its recipe) wrapped as the frozen predictor."""
    from hydra import compose, initialize_config_dir

    from fsseg.cli.common import config_dir, instantiate
    from fsseg.models.predictors import FrozenPredictor

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["method=ssp", f"recipe={recipe}", *encoder, "encoder.weights=none"])
    torch.manual_seed(0)
    return FrozenPredictor(instantiate(cfg.model, num_eval_classes=5), output_size=output_size)


def _pahnet_model(overrides: list[str], predictor, tmp: Path):
    """The PAHNet host built with predictor=none refused, so: build with a stand-in, then attach the predictor."""
    from hydra import compose, initialize_config_dir

    from fsseg.cli.common import config_dir, instantiate
    from fsseg.models.bam import BaseLearner
    from fsseg.models.base_learner import write_artifact

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "encoder.weights=none"])
        encoder = instantiate(cfg.encoder)
        learner = BaseLearner(encoder.tap_channels["base"], 15, list(range(6, 21)))
        meta = {"fold": 0, "encoder": encoder.name, "tap": "base", "in_dim": learner.in_dim,
                "base_class_ids": list(range(6, 21)), "bins": [1, 2, 3, 6]}  # fmt: skip
        path = write_artifact(tmp / f"{encoder.name}.pt", {f"head.{k}": v for k, v in learner.state_dict().items()}, meta)
        cfg = compose("train", overrides=[*overrides, "encoder.weights=none", f"base_learner_path={path}"])
    torch.manual_seed(0)
    return instantiate(cfg.model, num_eval_classes=5, predictor=predictor).eval()


def _step(model, batch):
    def fn():
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["logits"].float().mean().backward()

    return fn


def run(name: str, extra: list[str], size: int, batch_size: int, repeats: int, count_only: bool, pred_recipe: str, pred_size) -> None:
    print(f"  {name}")
    encoder = [e for e in extra if e.startswith("encoder=")]
    for host, (plain, pah, stem) in PAIRS.items():
        recipe = f"recipe={stem}_{'synth' if size <= 128 else 'pascal'}"
        pah_recipe = f"recipe={stem}_pahnet_{'synth' if size <= 128 else 'pascal'}"
        with tempfile.TemporaryDirectory() as tmp:
            base = _host_model([*plain, recipe, *extra], Path(tmp))
            pred = _predictor(encoder, pred_recipe, pred_size)
            full = _pahnet_model([*pah, pah_recipe, *extra], pred, Path(tmp))
        with torch.no_grad():
            cb, cp = model_cost(base, size), model_cost(full, size)
        print(f"    {host:10s} params {cb['params_m']:.3f} M -> +PAHNet {cp['params_m']:.3f} M;  "
              f"GFLOPs (multiply-adds) {cb['gflops']:.1f} -> {cp['gflops']:.1f}  (+{cp['gflops'] - cb['gflops']:.2f});  "
              f"conv/linear only {cb['gflops_modules']:.1f} -> {cp['gflops_modules']:.1f};  predictor {cp['predictor_gflops']:.1f}")  # fmt: skip
        if count_only:
            continue
        batch = episode_batch(size, 1, batch_size)
        full.train()
        steps = {"host step": _step(full, batch), "predictor": lambda m=full, b=batch: m.predictor(b)}
        times = interleaved(steps, repeats)
        print(f"    {host:10s} +PAHNet training step {times['host step'] * 1e3:.1f} ms (predictor included); predictor "
              f"forward {times['predictor'] * 1e3:.1f} ms = {times['predictor'] / times['host step']:.2f}x of the step")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = parser("pahnet", __doc__)
    ap.add_argument("--count-only", action="store_true", help="parameters and FLOPs only, no timing")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"fsseg-bench pahnet: CPU, {torch.get_num_threads()} threads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run("embedded (efficientnet-lite0, 128 px, batch 8, 1-shot)", [], 128, 8, args.repeats, args.count_only, "ssp_synth", None)
        if not args.skip_473:
            run("473 px / ResNet-50 (batch 1, 1-shot)", ["encoder=resnet50", "data.batch_size=1"], 473, 1,
                max(2, args.repeats // 2), args.count_only, "ssp_pascal", (64, 64))  # fmt: skip


if __name__ == "__main__":
    main()
