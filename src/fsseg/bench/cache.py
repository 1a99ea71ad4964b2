"""PFENet training step at the embedded size: full encoder (before truncation) vs truncated encoder vs cached taps.

    fsseg-bench cache [--threads 2] [--repeats 7] [--data data/synth --views 2]

Three settings, timed interleaved (a, b, c, a, b, c, ...; median of ``--repeats`` after a warm-up each):

  (a) full     the frozen efficientnet-lite0 as before issue 13's truncation: all seven block stages run
               (``fsseg.models.encoders._prune_after_deepest_tap`` patched to prune nothing);
  (b) trunc    today's encoder: it stops after the deepest tapped stage;
  (c) cache    ``data.feature_cache``: the batch holds the taps (float16, as read from the cache), the encoder
               does not run.

A step is forward + PFENet's losses + backward + optimiser step on one batch (batch 8, 1-shot, 128 px,
``experiment=pfenet_effl0_synth`` with random encoder weights: speed does not depend on them). FLOPs of one step
(torch.utils.flop_counter) are printed beside each. With ``--data <synth root>`` the data side is timed too:
building a batch from images (load, augment: ``TrainEpisodes``) vs from the cache (``CachedTrainEpisodes``;
the cache of ``--views`` views is built first if missing, under ``--cache-dir``, with the same key a training
run uses), and the end-to-end episodes/s (data + step, one process, as ``num_workers=0`` trains).
Timings on a shared machine are indicative only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from fsseg.cli.common import config_dir
from fsseg.cost import episode_batch
from fsseg.data import batch as B
from fsseg.models import encoders

OVERRIDES = ["experiment=pfenet_effl0_synth", "encoder.weights=none"]
SIZE, BATCH, SHOTS = 128, 8, 1


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=overrides)


@contextmanager
def untruncated():
    """Build encoders as before the truncation (every stage kept)."""
    saved = encoders._prune_after_deepest_tap
    encoders._prune_after_deepest_tap = lambda model: ()
    try:
        yield
    finally:
        encoders._prune_after_deepest_tap = saved


def build_model(full: bool, overrides: list[str]):
    cfg = _cfg(overrides)
    torch.manual_seed(0)
    if full:
        with untruncated():
            return instantiate(cfg.model, num_eval_classes=5)
    return instantiate(cfg.model, num_eval_classes=5)


def image_batch(gen: torch.Generator, size: int = SIZE, batch: int = BATCH) -> dict[str, torch.Tensor]:
    return episode_batch(size, SHOTS, batch, generator=gen, base_label=True)


def cached_batch(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same episodes as a cached batch: taps in float16 (as stored), no images."""
    with torch.no_grad():
        query, support = model.encode(batch)
    out = {k: v for k, v in batch.items() if k not in (B.QUERY_IMG, B.SUPPORT_IMGS)}
    for t in query:
        out[B.QUERY_TAP + t] = query[t].half()
        out[B.SUPPORT_TAP + t] = support[t].half()
    return out


def step_fn(model, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
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


def step_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def interleaved(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def data_side(root: str, views: int, cache_dir: str, repeats: int, batch: int = BATCH) -> dict[str, float]:
    """Seconds to build one training batch of ``batch`` episodes from images vs from the cache (built with the
    recipe's real encoder weights, so it is the cache `experiment=pfenet_effl0_synth_cached` trains on)."""
    from fsseg.data.episodes import collate_episodes

    cfg = _cfg(["experiment=pfenet_effl0_synth", f"paths.data_dir={root}/..", f"data.source.root={root}",
                f"paths.cache_dir={cache_dir}", f"data.feature_cache={{views: {views}}}"])  # fmt: skip
    model = instantiate(cfg.model, num_eval_classes=5)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    images = dm.train_dataset
    t = time.perf_counter()
    cache = dm.prepare_feature_cache(model)
    print(f"  cache: {cache} (ready in {time.perf_counter() - t:.1f} s)")
    cached = dm.train_dataset
    n = len(images)

    def loader(ds, offset):
        state = {"i": offset}

        def run():
            i = state["i"]
            collate_episodes([ds[(i + k) % n] for k in range(batch)])
            state["i"] = i + batch

        return run

    return interleaved({"images": loader(images, 0), "cache": loader(cached, 0)}, repeats)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fsseg-bench cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--data", default=None, help="embedded benchmark root (e.g. data/synth): time the data side too")
    ap.add_argument("--views", type=int, default=2, help="views of the cache --data builds or opens")
    ap.add_argument("--cache-dir", default="outputs/cache", help="paths.cache_dir of the cache --data uses")
    ap.add_argument("--size", type=int, default=SIZE, help="input size of the step timing (tests: smaller)")
    ap.add_argument("--batch", type=int, default=BATCH, help="episodes per step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    full, trunc = build_model(True, OVERRIDES), build_model(False, OVERRIDES)
    trunc.load_state_dict(full.state_dict(), strict=False)  # same head/decoder weights (speed only)
    batch = image_batch(gen, args.size, args.batch)
    fns = {"full": step_fn(full, batch), "trunc": step_fn(trunc, batch),
           "cache": step_fn(trunc, cached_batch(trunc, batch))}  # fmt: skip
    flops = {k: step_flops(fn) for k, fn in fns.items()}
    t = interleaved(fns, args.repeats)
    print(f"fsseg-bench cache: PFENet training step, efficientnet-lite0 OS 8, {args.size} px, batch {args.batch}, {SHOTS}-shot; "
          f"{args.threads} threads, median of {args.repeats} interleaved repeats (indicative on a shared machine)")  # fmt: skip
    labels = {"full": "(a) full encoder (before truncation)", "trunc": "(b) truncated encoder",
              "cache": "(c) cached taps (no encoder)"}  # fmt: skip
    for k in fns:
        print(f"  {labels[k]:38s} {t[k]:.3f} s/step = {args.batch / t[k]:6.2f} episodes/s | {flops[k] / 1e9:6.2f} GFLOP/step")
    for name, num, den in (("b/a", "trunc", "full"), ("c/a", "cache", "full"), ("c/b", "cache", "trunc")):
        print(f"  speed-up {name} ({num} vs {den}): x{t[den] / t[num]:.2f} per step "
              f"(FLOP ratio x{flops[den] / max(1, flops[num]):.2f})")
    if args.data:
        d = data_side(args.data, args.views, args.cache_dir, args.repeats, args.batch)
        print(f"  data side, one batch of {args.batch} episodes built in-process (num_workers=0):")
        print(f"    from images (load + augment) {d['images']:.3f} s | from the cache ({args.views} views) {d['cache']:.3f} s")
        e2e = {"full": d["images"] + t["full"], "trunc": d["images"] + t["trunc"], "cache": d["cache"] + t["cache"]}
        for k, seconds in e2e.items():
            print(f"    end to end {labels[k]:38s} {args.batch / seconds:6.2f} episodes/s")
        print(f"    end-to-end speed-up c/a x{e2e['full'] / e2e['cache']:.2f}, c/b x{e2e['trunc'] / e2e['cache']:.2f}, "
              f"b/a x{e2e['full'] / e2e['trunc']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
