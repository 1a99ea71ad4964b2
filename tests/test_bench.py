"""The benchmark commands run and print their ratios (smallest setting, one repeat: a smoke test, not a timing)."""

from __future__ import annotations

import re

import pytest
import torch


@pytest.mark.parametrize("name, ratio", [("apanet", "APANet/PFENet"), ("celp", "CELP/PFENet")])
def test_overhead_benchmarks_print_a_ratio(name, ratio, capsys):
    from fsseg.cli.bench import available, main

    assert name in available() and "_timing" not in available()
    main([name, "--only", "embedded-features", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    match = re.search(rf"{ratio} = (\d+\.\d\d)x time \| (\d+\.\d\d)x FLOPs", out)
    assert match and float(match.group(1)) > 0.5, out
    # the branch adds a second decoder pass: more FLOPs than PFENet's step, and less than 3x
    assert 1.0 < float(match.group(2)) < 3.0, out


def test_pfenet_bench_prints_the_truncation_ratio_and_flops(monkeypatch, capsys):
    import fsseg.bench.pfenet as bench

    tiny = (["encoder=efficientnet_lite0", "encoder.weights=none", "decoder.bins=[1.0,0.5]"], 32, 1)
    monkeypatch.setattr(bench, "SETTINGS", {"embedded": tiny})
    bench.main(["--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    match = re.search(r"before/after = (\d+\.\d\d)x time, (\d+\.\d\d)x FLOPs", out)
    assert match, out
    assert float(match.group(2)) > 1.0, out  # the full encoder runs two more stages: strictly more FLOPs
    assert "fraction of the bf16 peak: unmeasured (no GPU)" in out
    assert re.search(r"train step .* GFLOP .* episodes/s", out), out


def test_flop_counter_counts_a_known_matmul():
    import torch

    from fsseg.bench._timing import count_flops

    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_bam_bench_prints_its_evaluation_cost_relative_to_pfenet(capsys):
    import re

    from fsseg.bench import bam

    bam.main(["--skip-473", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    m = re.search(r"BAM/PFENet evaluation: ([\d.]+)x time, ([\d.]+)x FLOPs", out)
    assert m, out
    # BAM runs the encoder to its last stage (the base learner's input) and adds the base learner and ASPP:
    # strictly more work than PFENet on the same episodes
    assert float(m.group(2)) > 1.0


def test_i2r_bench_prints_its_cost_relative_to_bam_and_dicms_share(capsys):
    import re

    from fsseg.bench import i2r

    i2r.main(["--skip-473", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    m = re.search(r"I2R/BAM evaluation: ([\d.]+)x time, ([\d.]+)x FLOPs", out)
    assert m, out
    # I2R adds the CAMs (a forward and a backward through the classifier) and the attention decoder to BAM's work
    assert float(m.group(2)) > 1.0
    assert re.search(r"DICM masks of 5 cross blocks .* = [\d.]+%", out), out


def test_pahnet_bench_counts_parameters_and_flops_without_training(capsys):
    """Counts only (no timing): random stage-1 file and random SSP predictor, embedded size."""
    import re

    from fsseg.bench import pahnet

    pahnet.main(["--skip-473", "--count-only", "--threads", "1"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"(HDMNet|SCCAN-Plus)\s+params ([\d.]+ M -> \+PAHNet [\d.]+) M", out))
    before, after = (float(v) for v in rows["HDMNet"].replace(" M -> +PAHNet", "").split())
    assert after - before == pytest.approx(0.384, abs=1e-3)  # 3 x (PFE 127,872 + ASC 128) at C = 64
    assert "SCCAN-Plus" in rows and "predictor" in out


def test_affinity_bench_prints_time_and_flop_ratios_and_peak_memory(capsys):
    """Embedded setting at batch 2 and the memory probe at 64 px (one fresh process per method): a smoke test of
    the command plus two FLOP facts that hold whatever the machine."""
    import re

    from fsseg.bench import affinity

    affinity.main(["--skip-473", "--repeats", "1", "--threads", "1", "--batch-size", "2"])
    out = capsys.readouterr().out
    evals = dict(re.findall(r"(SCCAN|HDMNet|Aff)/PFENet: .* evaluation [\d.]+x time, ([\d.]+)x FLOPs", out))
    assert set(evals) == {"SCCAN", "HDMNet", "Aff"}, out
    # HDMNet runs the encoder to its last stage and the base learner on query and support (notes: 57.8 vs 25.6
    # GFLOP at batch 8): more than PFENet; Aff is SCCAN without the support branch's updates: fewer than SCCAN
    assert float(evals["HDMNet"]) > 1.5, out
    assert float(evals["Aff"]) < float(evals["SCCAN"]), out
    affinity.main(["--memory-only", "--memory-size", "64", "--threads", "1", "--methods", "Aff"])
    out = capsys.readouterr().out
    peaks = dict(re.findall(r"(PFENet|Aff)\s+(\d+\.\d\d) GiB peak resident set over the step", out))
    assert set(peaks) == {"PFENet", "Aff"}, out
    # Aff's global cross-attention over SCCAN's 64 x 64 token grid (4096 x 4096 scores per head and block, kept
    # for backward) outweighs PFENet's whole step at this size
    assert float(peaks["Aff"]) > float(peaks["PFENet"]), out
    with pytest.raises(SystemExit, match="--methods"):
        affinity.main(["--methods", "SCCAN,BAM"])


def test_cam_probe_scores_a_classifier_whose_cam_is_the_object():
    """fsseg-bench cam's measures on a hand-made case: the class-0 logit is the mean of channel 0, which holds the
    object, so the support's class is 0, the query agrees, and the CAM of class 0 is the object (IoU 1 at every
    threshold); a random class's CAM is empty or the object, never anything else."""
    from fsseg.bench.cam import THRESHOLDS, probe

    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[0, 2:5, 1:6] = True
    mask[1, 4:8, 3:7] = True
    feats = torch.stack([mask.float(), torch.zeros(2, 8, 8)], dim=1)  # (B, 2, h, w)

    def classify(x):
        return x.mean(dim=(2, 3))

    out = probe(classify, feats, feats, mask, mask, "xgradcam", torch.Generator().manual_seed(0))
    assert out["agree"].tolist() == [1.0, 1.0]
    for t in THRESHOLDS:
        assert out[f"q_iou@{t}"].tolist() == [1.0, 1.0] and out[f"s_iou@{t}"].tolist() == [1.0, 1.0]
        assert set(out[f"q_iou_random@{t}"].tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out["object_area"], mask.flatten(1).float().mean(1))
