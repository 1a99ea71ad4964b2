"""PFENet throughput on this machine: training steps (forward + backward + SGD step) and evaluation episodes.

    fsseg-bench pfenet [--threads 2] [--repeats 5] [--skip-473]

Two settings: the embedded benchmark (efficientnet-lite0 OS 8, 128 px, batch 8, 1-shot) and the papers'
size (ResNet-50 OS 8, 473 px, batch 4 as PFENet's PASCAL recipe, 1-shot; random weights: speed does not
depend on them). Inputs are random tensors of the right shapes, so no dataset is needed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fsseg.cli.common import config_dir
from fsseg.data import batch as B


def fake_batch(b: int, k: int, size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = lambda *s: (torch.rand(*s, generator=gen) > 0.6).long()
    return {
        B.QUERY_IMG: torch.randn(b, 3, size, size, generator=gen),
        B.SUPPORT_IMGS: torch.randn(b, k, 3, size, size, generator=gen),
        B.QUERY_MASK: mask(b, size, size),
        B.SUPPORT_MASKS: mask(b, k, size, size),
        B.CLASS_IDX: torch.zeros(b, dtype=torch.long),
    }


def build(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.model, num_eval_classes=5)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def train_step_fn(model, batch):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    model.train()

    def step():
        out = model(batch)
        loss = model.main_loss_weight * model.main_loss(out["logits"], batch[B.QUERY_MASK])
        for aux in model.aux_losses.values():
            for v in aux(out, batch, model).values():
                loss = loss + aux.weight * v
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def eval_fn(model, batch):
    def run():
        model.eval()
        with torch.no_grad():
            model.predict(batch)

    return run


SETTINGS = {
    "embedded": (["encoder=efficientnet_lite0", "encoder.weights=none", "decoder.bins=[1.0,0.5,0.25,0.125]"], 128, 8),
    "473-resnet50": (["encoder=resnet50", "encoder.weights=none"], 473, 4),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fsseg-bench pfenet")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-473", action="store_true")
    ap.add_argument("--method", default="pfenet", help="conf/method file to benchmark")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"{args.method}: {args.threads} threads, median of {args.repeats}")
    for name, (overrides, size, bsz) in SETTINGS.items():
        if args.skip_473 and name != "embedded":
            continue
        model = build([f"method={args.method}", *overrides])
        batch = fake_batch(bsz, 1, size, gen)
        t_train = time_it(train_step_fn(model, batch), args.repeats)
        t_eval = time_it(eval_fn(model, batch), args.repeats)
        print(f"  {name:14s} batch {bsz}: train step {t_train:.3f} s = {bsz / t_train:6.2f} episodes/s | "
              f"eval {bsz / t_eval:6.2f} episodes/s ({1000 * t_eval / bsz:.0f} ms/episode)")  # fmt: skip


if __name__ == "__main__":
    main()
