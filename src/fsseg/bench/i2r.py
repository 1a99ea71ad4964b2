"""Evaluation cost of I2R relative to BAM on the same episodes (issue 17), the encoder included, and the share of
DICM's mask construction in a decoder training step.

    fsseg-bench i2r                      # embedded size (efficientnet-lite0, 128 px) and 473 px / ResNet-50 shapes
    fsseg-bench i2r --skip-473 --repeats 7

Models from the configs with random weights (`method=bam recipe=bam_synth` vs `method=i2r recipe=i2r_synth`; at
473 px `recipe=bam_pascal` vs `recipe=i2r_pascal`, both on ResNet-50 shapes: I2R on torchvision's non-dilated
ResNet-50, BAM on the dilated deep-stem one, as the papers), a random base learner of the fold's shape. I2R's
evaluation includes its CAMs (one forward + backward through the encoder's tail after the CAM tap) and runs
without test-time scales (`model.tta_scales=[1.0]`; the reference's three scales multiply it by ~2.4).
Times: medians of interleaved rounds; FLOPs (matmuls and convolutions, the CAM's backward included) beside them.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from fsseg.bench._timing import count_flops, describe, interleaved, parser
from fsseg.bench.bam import _batch, _model


def run(name: str, bam: list[str], i2r: list[str], batch: dict, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = {"BAM": _model(bam, Path(tmp)), "I2R": _model(i2r, Path(tmp))}
    steps = {k: (lambda m=m: m.predict(batch)) for k, m in models.items()}
    times = interleaved(steps, repeats)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    print(f"  {name}")
    for k in models:
        print(f"    eval {k:4s} {describe(times[k], flops[k])}")
    t, f = times["I2R"] / times["BAM"], flops["I2R"] / flops["BAM"]
    print(f"    I2R/BAM evaluation: {t:.2f}x time, {f:.2f}x FLOPs (time/FLOP ratio {t / f:.2f})")


def dicm_share(dim: int, size: int, batch: int, blocks: tuple[int, int], repeats: int) -> None:
    """DICM's mask construction (every cross block, on the detached scores) against a decoder training step."""
    from fsseg.models.i2r import I2RDecoder, attention_mask

    torch.manual_seed(0)
    dec = I2RDecoder(dim=dim, num_decoders=blocks[0], num_cross_blocks=blocks[1], attention_mask="dicm").train()
    g = torch.Generator().manual_seed(0)
    guidance = {
        "query_feat": torch.randn(batch, dim, size, size, generator=g), "prototype": torch.randn(batch, dim, 1, 1, generator=g),
        "prior": torch.rand(batch, 1, size, size, generator=g), "region_feat": torch.randn(batch, dim, size, size, generator=g),
        "support_feat": torch.randn(batch, 1, dim, size, size, generator=g),
        "support_prototype": torch.randn(batch, 1, dim, 1, 1, generator=g),
        "support_region_feat": torch.randn(batch, 1, dim, size, size, generator=g),
        "support_prior": torch.rand(batch, 1, 1, size, size, generator=g),
        "support_mask_tokens": torch.rand(batch, 1, size, size, generator=g) > 0.6,
    }  # fmt: skip

    class Ctx:
        query_mask = (torch.rand(batch, size, size, generator=g) > 0.6).long()

    def step() -> None:
        out = dec(guidance, context=Ctx())
        (out["logits"].sum() + sum(x.sum() for x in out["inner_logits"])).backward()

    n = size * size
    scores = torch.randn(batch, n, n, generator=g)
    s_lab, q_lab = torch.rand(batch, n, generator=g) > 0.6, torch.rand(batch, n, generator=g) > 0.6
    masks = lambda: [attention_mask(scores, "dicm", s_lab, q_lab) for _ in range(blocks[1])]
    times = interleaved({"step": step, "masks": masks}, repeats)
    print(f"  DICM masks of {blocks[1]} cross blocks vs a decoder training step (dim {dim}, {size}x{size} tokens, batch "
          f"{batch}): {1e3 * times['masks']:.2f} ms / {1e3 * times['step']:.1f} ms = {100 * times['masks'] / times['step']:.2f}%")


def main(argv: list[str] | None = None) -> None:
    ap = parser("i2r", __doc__)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"fsseg-bench i2r: CPU, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            run("embedded (efficientnet-lite0, 128 px, batch 8, 1-shot)", ["method=bam", "recipe=bam_synth"],
                ["method=i2r", "recipe=i2r_synth"], _batch(8, 128), args.repeats)  # fmt: skip
            if not args.skip_473:
                common = ["data.batch_size=1", "model.tta_scales=[1.0]"]
                run("473 px / ResNet-50 (batch 1, 1-shot)", ["method=bam", "recipe=bam_pascal", "encoder=resnet50", *common],
                    ["method=i2r", "recipe=i2r_pascal", "encoder=resnet50_tv", *common], _batch(1, 473),
                    max(2, args.repeats // 2))  # fmt: skip
        dicm_share(128, 16, 8, (6, 5), args.repeats)
        if not args.skip_473:
            dicm_share(256, 30, 2, (6, 5), max(2, args.repeats // 2))


if __name__ == "__main__":
    main()
