"""fsseg-bench cache (smoke: small input, one repeat) and the cached-taps forward it times."""

from __future__ import annotations

import re

import torch

from fsseg.bench import cache as bench
from fsseg.data import batch as B


def test_cached_batch_gives_the_image_batchs_logits():
    model = bench.build_model(False, bench.OVERRIDES).eval()
    batch = bench.image_batch(torch.Generator().manual_seed(0), size=64, batch=2)
    cached = bench.cached_batch(model, batch)
    assert B.QUERY_IMG not in cached and cached[B.SUPPORT_TAP + "mid"].dtype == torch.float16
    with torch.no_grad():
        ref, got = model(batch)["logits"], model(cached)["logits"]
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)  # the taps went through float16
    assert not torch.equal(got, ref)  # ...and were really read from the batch


def test_untruncated_builds_the_full_encoder():
    full, trunc = bench.build_model(True, bench.OVERRIDES), bench.build_model(False, bench.OVERRIDES)
    assert len(full.encoder.model.blocks) == 7 and len(trunc.encoder.model.blocks) == 5


def test_bench_prints_speed_and_flop_ratios(capsys):
    from fsseg.cli.bench import available, main

    assert "cache" in available()
    main(["cache", "--repeats", "1", "--threads", "1", "--size", "64", "--batch", "2"])
    out = capsys.readouterr().out
    flops = {k: float(v) for k, v in re.findall(r"speed-up (\w/\w) .*FLOP ratio x(\d+\.\d\d)", out)}
    assert set(flops) == {"b/a", "c/a", "c/b"}, out
    # the truncation and the cache each remove encoder FLOPs (deterministic, unlike the timings)
    assert flops["b/a"] > 1.05 and flops["c/b"] > 1.02 and flops["c/a"] > flops["b/a"], out
    assert re.search(r"\(c\) cached taps .* episodes/s", out)
