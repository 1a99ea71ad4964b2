"""Training-step time of PFENet + CELP (latent prototype sampling + contrastive enhancement) relative to PFENet,
same batch, same init (issue goal: <= 1.10x).

    fsseg-bench celp                                   # embedded (encoder + fed taps), ResNet-50 473 shapes
    fsseg-bench celp --only embedded-encoder --repeats 7

Settings, batch and step are APANet's benchmark's (fsseg.bench.apanet: same shapes, same SGD step), with the
query's base-class label map CELP reads (a labelled object beside the target). Both models keep PFENet's two
reductions, so the ratio is the branch's cost alone (method=celp also shares one reduction, which is cheaper).
The breakdown times the branch without its decoder pass (sampling, pseudo-mask, prototype, prior), forward only.
"""

from __future__ import annotations

import argparse
import time

import torch

from fsseg.bench.apanet import (
    Setting,
    bench_main,
    compare,
    header,
    make_batch,
    make_encoder,
    make_step,
    ratio_line,
)
from fsseg.data import batch as B
from fsseg.models.celp import LatentContrast
from fsseg.models.losses import CrossEntropy, DeepSupervision
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter


def make_model(setting: Setting, encoder: torch.nn.Module, celp: bool, batched: bool = False) -> FewShotSegmenter:
    aux: dict[str, torch.nn.Module] = {"deep_supervision": DeepSupervision(1.0)}
    if celp:
        aux["latent_contrast"] = LatentContrast(weight=0.1, seed=0)
    torch.manual_seed(0)
    return FewShotSegmenter(
        encoder=encoder,
        head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=256),
        decoder=FeatureEnrichmentModule(dim=256, bins=setting.bins),
        main_loss=CrossEntropy(),
        aux_losses=aux,
        batched_aux_decoder=batched,
    )


def celp_batch(setting: Setting, shots: int) -> dict[str, torch.Tensor]:
    batch = make_batch(setting, shots)
    s = setting.size
    base = batch[B.QUERY_MASK] * 3  # the target (a base class in training) ...
    base[:, : s // 5, : s // 5] = 7  # ... and another labelled base-class object
    batch[B.QUERY_BASE_LABEL] = base
    return batch


def run(setting: Setting, args: argparse.Namespace) -> None:
    encoder = make_encoder(setting, args.shots)
    batch = celp_batch(setting, args.shots)
    pfenet, celp = make_model(setting, encoder, False), make_model(setting, encoder, True)
    steps = {"pfenet": make_step(pfenet, batch), "celp": make_step(celp, batch)}
    if args.batched:
        steps["batched"] = make_step(make_model(setting, encoder, True, batched=True), batch)
    times, flops = compare(steps, args.repeats)
    branch = celp.aux_losses["latent_contrast"]
    with torch.no_grad():
        out = celp(batch)
        own = []
        for _ in range(max(3, args.repeats)):
            t0 = time.perf_counter()
            branch.contrast_guidance(out, batch)
            own.append(time.perf_counter() - t0)
    print(header(setting, args.shots))
    print(ratio_line("CELP/PFENet", times, flops, "celp"))
    if args.batched:
        print(ratio_line("CELP batched decoder/PFENet", times, flops, "batched")
              + f"; batched/two-pass time {times['batched'] / times['celp']:.2f}x")  # fmt: skip
    print(f"    branch without its decoder pass {1e3 * min(own):7.1f} ms ({min(own) / times['pfenet']:.1%} of a PFENet step)")


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, run)


if __name__ == "__main__":
    main()
