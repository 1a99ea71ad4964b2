"""Cost of the affinity learners SCCAN, HDMNet and Aff relative to PFENet (issue 18, Performance): training-step and
evaluation time with their FLOPs, at the embedded size and at 473 px / ResNet-50 shapes, and the peak memory of
one 473 px training step.

    fsseg-bench affinity                       # both sizes, times and memory
    fsseg-bench affinity --skip-473 --repeats 7
    fsseg-bench affinity --memory-only         # the 473 px peak memory alone (one fresh process per method)
    fsseg-bench affinity --methods HDMNet      # one method against PFENet

Models come from the configs with random weights (`method=pfenet recipe=synth`, `method=sccan recipe=sccan_synth`,
`method=hdmnet recipe=hdmnet_synth`, `method=aff recipe=sccan_synth`; at 473 px the `*_pascal` recipes with
ResNet-50), HDMNet with a random stage-1 base learner of the fold's shape (no stage-1 file needed). A training step
is the LightningModule's ``training_step`` (forward, main and auxiliary losses) + backward + an SGD step over the
trainable parameters, on one random batch (``fsseg.cost.episode_batch``; the embedded recipes' batch 8, batch 1
at 473 px); evaluation is ``predict`` on the same batch. Times: ``torch.utils.benchmark`` medians of interleaved
rounds; FLOPs: ``torch.utils.flop_counter`` (matmuls and convolutions, backward included).

Peak memory: each method's training step runs in a fresh Python process (so one model's high-water mark cannot
hide another's). On CUDA it is ``torch.cuda.max_memory_allocated`` over the step minus what was allocated before
it (tensors only, allocator cache excluded). On CPU there is no allocator counter: the figure is the process's
peak resident set over the step (Linux VmHWM, reset through /proc/self/clear_refs once the model and batch are
built) minus its resident set just before it, i.e. the first step's activations, gradients, optimizer state and
workspace as the OS saw them; glibc keeps some freed memory mapped, so read it as an upper bound of the tensors'
peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from fsseg.bench._timing import count_flops, describe, interleaved, parser
from fsseg.bench.bam import _model
from fsseg.bench.pfenet import eval_fn, train_step_fn
from fsseg.cost import episode_batch

# label -> (embedded overrides, 473 px overrides)
METHODS = {
    "PFENet": (["method=pfenet", "recipe=synth"], ["method=pfenet", "recipe=pascal"]),
    "SCCAN": (["method=sccan", "recipe=sccan_synth"], ["method=sccan", "recipe=sccan_pascal"]),
    "HDMNet": (["method=hdmnet", "recipe=hdmnet_synth"], ["method=hdmnet", "recipe=hdmnet_pascal"]),
    "Aff": (["method=aff", "recipe=sccan_synth"], ["method=aff", "recipe=sccan_pascal"]),
}
R50 = ["encoder=resnet50", "data.batch_size=1"]


def _build(overrides: list[str], device: torch.device):
    with tempfile.TemporaryDirectory() as tmp:
        return _model(overrides, Path(tmp)).to(device)


def _batch(size: int, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in episode_batch(size, 1, batch, base_label=True).items()}


def timings(name: str, which: int, size: int, bsz: int, repeats: int, device: torch.device, methods: list[str]) -> None:
    extra = R50 if which else []
    models = {k: _build([*METHODS[k][which], *extra], device) for k in ["PFENet", *methods]}
    batch = _batch(size, bsz, device)
    steps = {}
    for k, m in models.items():
        steps[f"{k} train"] = train_step_fn(m, batch, device, "none")
        steps[f"{k} eval"] = eval_fn(m, batch, device, "none")
    times = interleaved(steps, repeats)
    flops = {k: count_flops(fn) for k, fn in steps.items()}
    print(f"  {name}")
    for k in models:
        for kind in ("train", "eval"):
            key = f"{k} {kind}"
            print(f"    {kind:5s} {k:6s} {describe(times[key], flops[key])}")
    for k in models:
        if k == "PFENet":
            continue
        t = {kind: times[f"{k} {kind}"] / times[f"PFENet {kind}"] for kind in ("train", "eval")}
        f = {kind: flops[f"{k} {kind}"] / flops[f"PFENet {kind}"] for kind in ("train", "eval")}
        print(f"    {k}/PFENet: training step {t['train']:.2f}x time, {f['train']:.2f}x FLOPs; "
              f"evaluation {t['eval']:.2f}x time, {f['eval']:.2f}x FLOPs")  # fmt: skip


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith(field + ":")).split()[1])


def peak_child(label: str, device_name: str, threads: int, size: int = 473) -> dict:
    """One ``size`` px (ResNet-50 recipe) training step of ``label`` in this (fresh) process; its peak memory in
    bytes."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build([*METHODS[label][1], *R50], device)
    batch = _batch(size, 1, device)
    step = train_step_fn(model, batch, device, "none")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"label": label, "what": "max_memory_allocated over the step",
                "peak_bytes": torch.cuda.max_memory_allocated(device) - before, "baseline_bytes": before}  # fmt: skip
    with open("/proc/self/clear_refs", "w") as fh:  # Linux: reset the peak resident set (VmHWM) to the current one
        fh.write("5")
    before = _status_kib("VmRSS") * 1024
    step()
    peak = _status_kib("VmHWM") * 1024
    return {"label": label, "what": "peak resident set over the step", "peak_bytes": peak - before, "baseline_bytes": before}


def memory(device: torch.device, threads: int, methods: list[str], size: int = 473) -> None:
    print(f"  peak memory of one {size} px / ResNet-50 training step (batch 1, 1-shot; fresh process per method, {device.type})")
    for label in ["PFENet", *methods]:
        cmd = [sys.executable, "-m", "fsseg.bench.affinity", "--_peak-child", label, "--device", device.type,
               "--threads", str(threads), "--memory-size", str(size)]  # fmt: skip
        out = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"fsseg-bench affinity: the memory probe of {label} failed:\n{out.stderr[-2000:]}")
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"    {label:6s} {rec['peak_bytes'] / 2**30:6.2f} GiB {rec['what']} "
              f"(before it: {rec['baseline_bytes'] / 2**30:.2f} GiB)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = parser("affinity", __doc__, "embedded size only (no 473 px times, no memory)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--memory-size", type=int, default=473, help="input size of the memory probe (473: the papers')")
    ap.add_argument("--batch-size", type=int, default=8, help="embedded setting's batch (8: the embedded recipes')")
    ap.add_argument("--methods", default="SCCAN,HDMNet,Aff", help="comma list of methods compared with PFENet")
    ap.add_argument("--_peak-child", dest="peak_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))  # fmt: skip
    methods = [m for m in args.methods.split(",") if m and m != "PFENet"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"fsseg-bench affinity: --methods {unknown} unknown; expected a comma list of {sorted(METHODS)}")
    if args.peak_child:
        print(json.dumps(peak_child(args.peak_child, device.type, args.threads, args.memory_size)))
        return
    torch.set_num_threads(args.threads)
    print(f"fsseg-bench affinity: {device.type}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds")
    if not args.memory_only:
        timings(f"embedded (efficientnet-lite0, 128 px, batch {args.batch_size}, 1-shot)", 0, 128, args.batch_size,
                args.repeats, device, methods)  # fmt: skip
        if not args.skip_473:
            timings("473 px / ResNet-50 (batch 1, 1-shot)", 1, 473, 1, max(2, args.repeats // 2), device, methods)
    if not args.skip_473 or args.memory_only:
        memory(device, args.threads, methods, args.memory_size)


if __name__ == "__main__":
    main()
