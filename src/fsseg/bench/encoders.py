"""Frozen-encoder throughput on this machine (no grad, eval): decides the embedded demo's budget.

    fsseg-bench encoders                 # the default grid, 2 threads
    fsseg-bench encoders --threads 2 --repeats 3 --only lite

Prints images/s for tf_efficientnet_lite0 (packaged weights) at 128 and 160 px, batch 16, output stride 8, 16
and 32 (None), and ResNet-50 (PSPNet stem, OS 8) at 473 px, batch 2 - the PFENet setting.
"""

from __future__ import annotations

import argparse
import time

import torch

from fsseg.models.encoders import FrozenEncoder

TAPS = {"mid": [3, 2], "high": [4]}


def measure(encoder: FrozenEncoder, size: int, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size)
    encoder(x)  # warm-up (allocator, oneDNN kernels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder(x)
        best = min(best, time.perf_counter() - start)
    return batch / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["lite", "resnet"], default=None)
    parser.add_argument("--nchw", action="store_true", help="channels_last=False (the slower memory format)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cl = not args.nchw
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}, "
        f"channels_last={cl}"
    )
    if args.only in (None, "lite"):
        for os_ in (8, 16, None):
            enc = FrozenEncoder(
                "tf_efficientnet_lite0", TAPS, output_stride=os_, weights="package",
                mean=(0.5,) * 3, std=(0.5,) * 3, channels_last=cl,
            )
            for size in (128, 160):
                ips = measure(enc, size, 16, args.repeats)
                shapes = {k: tuple(v.shape[1:]) for k, v in enc(torch.zeros(1, 3, size, size)).items()}
                print(f"tf_efficientnet_lite0 OS{os_ or 32:<2} {size}px batch 16: {ips:7.1f} img/s  {shapes}")
    if args.only in (None, "resnet"):
        enc = FrozenEncoder("resnet50s", TAPS, output_stride=8, pspnet_dilation=True, channels_last=cl)
        ips = measure(enc, 473, 2, args.repeats)
        print(f"resnet50s (PSPNet stem) OS8 473px batch 2: {ips:7.2f} img/s ({1 / ips:.2f} s/img)")


if __name__ == "__main__":
    main()
