"""PFENet throughput on this machine: training steps (forward + backward + SGD step) and evaluation episodes,
each with its FLOPs, and the encoder truncation's before/after ratio (issue 13 item 1).

    fsseg-bench pfenet [--threads 2] [--repeats 5] [--skip-473] [--device auto|cpu|cuda] [--amp auto|bf16|none]

Two settings: the embedded benchmark (efficientnet-lite0 OS 8, 128 px, batch 8, 1-shot) and the papers'
size (ResNet-50 OS 8, 473 px, batch 4 as PFENet's PASCAL recipe, 1-shot; random weights: speed does not
depend on them). Inputs are random tensors of the right shapes, so no dataset is needed.

"before" is the same model with the encoder NOT truncated after its deepest tapped stage
(``fsseg.models.encoders._prune_after_deepest_tap`` patched to prune nothing, as tests/models/test_encoders.py
does): EfficientNet then runs all seven block stages. ResNet-50's timm feature wrapper already ends at layer4,
the deepest tap, so at 473 px both are the same network and only "after" is timed.

Times: ``torch.utils.benchmark.Timer`` (CUDA-synchronised), median of ``--repeats`` interleaved rounds after a
warm-up; FLOPs: ``torch.utils.flop_counter`` (matmul/conv, forward + backward). On a GPU the evaluation line also
gives the achieved fraction of the device's dense bf16 peak (goal: >= 30%); on CPU it says "unmeasured".
"""

from __future__ import annotations

import argparse
import contextlib
import warnings

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fsseg.bench._timing import count_flops, describe, interleaved, peak_fraction
from fsseg.cli.common import config_dir
from fsseg.data import batch as B
from fsseg.models import encoders


def fake_batch(b: int, k: int, size: int, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    mask = lambda *s: (torch.rand(*s, generator=gen) > 0.6).long()
    batch = {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=gen),
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=gen),
        B.QUERY_MASK: mask(b, size, size),
        B.SUPPORT_MASKS: mask(b, k, size, size),
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }
    return {key: v.to(device) for key, v in batch.items()}


def build(overrides: list[str], truncated: bool = True):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if truncated:
        return instantiate(cfg.model, num_eval_classes=5)
    original = encoders._prune_after_deepest_tap
    encoders._prune_after_deepest_tap = lambda model: ()  # the encoder as before item 1: every stage runs
    try:
        torch.manual_seed(0)
        return instantiate(cfg.model, num_eval_classes=5)
    finally:
        encoders._prune_after_deepest_tap = original


def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step_fn(model, batch, device: torch.device, amp: str):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        model.train()  # each call: the evaluation timed in the same rounds leaves the model in eval mode
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LightningModule.log without a Trainer
            loss = model.training_step(batch, 0)
        loss.backward()
        opt.step()

    return step


def eval_fn(model, batch, device: torch.device, amp: str):
    def run():
        model.eval()
        with torch.no_grad(), autocast(device, amp):
            model.predict(batch)

    return run


SETTINGS = {
    "embedded": (["encoder=efficientnet_lite0", "encoder.weights=none", "decoder.bins=[1.0,0.5,0.25,0.125]"], 128, 8),
    "473-resnet50": (["encoder=resnet50", "encoder.weights=none"], 473, 4),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fsseg-bench pfenet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-473", action="store_true")
    ap.add_argument("--method", default="pfenet", help="conf/method file to benchmark")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="auto: bf16 on CUDA, none on CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    amp = ("bf16" if device.type == "cuda" else "none") if args.amp == "auto" else args.amp
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    gen = torch.Generator().manual_seed(0)
    print(f"{args.method}: {device.type}, {args.threads} threads, amp={amp}, median of {args.repeats} interleaved "
          "rounds (torch.utils.benchmark), FLOPs by torch.utils.flop_counter")  # fmt: skip
    for name, (overrides, size, bsz) in SETTINGS.items():
        if args.skip_473 and name != "embedded":
            continue
        overrides = [f"method={args.method}", *overrides]
        torch.manual_seed(0)
        model = build(overrides).to(device)
        batch = fake_batch(bsz, 1, size, gen, device)
        steps = {"train": train_step_fn(model, batch, device, amp), "eval": eval_fn(model, batch, device, amp)}
        before = None
        if name == "embedded":
            before = build(overrides, truncated=False).to(device)
            steps["train_before"] = train_step_fn(before, batch, device, amp)
        times = interleaved(steps, args.repeats)
        flops = {k: count_flops(fn) for k, fn in steps.items()}
        t_train, t_eval = times["train"], times["eval"]
        print(f"  {name:14s} batch {bsz}: train step {describe(t_train, flops['train'])} = "
              f"{bsz / t_train:6.2f} episodes/s")  # fmt: skip
        if before is not None:
            tb, fb = times["train_before"], flops["train_before"]
            print(f"  {'':14s} before (full encoder): {describe(tb, fb)} = {bsz / tb:6.2f} episodes/s\n"
                  f"  {'':14s} encoder truncation: train step before/after = {tb / t_train:.2f}x time, "
                  f"{fb / flops['train']:.2f}x FLOPs (goal >= 1.6x)")  # fmt: skip
        print(f"  {'':14s} eval: {describe(t_eval, flops['eval'])} = {bsz / t_eval:6.2f} episodes/s "
              f"({1000 * t_eval / bsz:.0f} ms/episode); {peak_fraction(t_eval, flops['eval'], device)}")  # fmt: skip
        if name == "473-resnet50":
            print(f"  {'':14s} vs the reference PFENet code (goal >= 5x its episodes/s on a GPU): unmeasured here "
                  "(needs the reference code on the same GPU)")  # fmt: skip


if __name__ == "__main__":
    main()
