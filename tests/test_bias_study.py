"""The bias study's code (issue 20): the stage-1 pick rule, stage 2's confirmation and the figure, read from run
directories.

The run directories here are fakes (config.yaml + metrics.json + fsseg-bias's four evaluations and its base-class
control) with hand-chosen numbers; the expected picks, gaps, bias measures and plotted means are computed by hand
below."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fsseg.cli import bias_study
from fsseg.cli.bias_study import pick, point_overrides, read_runs

REPO = Path(__file__).resolve().parents[1]


def _dataset(root: Path, share_counts: tuple[int, int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with_novel, base = share_counts
    nov = {str(f): {"base_images_with_novel": with_novel, "base_images": base} for f in range(4)}
    (root / "meta.json").write_text(json.dumps({"novel_in_train": nov}))
    return root


def _metrics(d: Path, miou: float) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({"metrics": {"miou": miou}, "episodes": 300}))


def _run(out: Path, data: Path, *, method="pfenet", flt="keep", length=2000, fold=0, seed=0, miou=0.40,
         evals: tuple[float, float, float, float] | None = None, base: float | None = 0.40) -> Path:
    """A finished run; ``evals`` = novel mIoU on train +base, train -base, val +base, val -base; ``base`` = the
    base-class control's mIoU (written with ``evals``)."""
    d = out / f"{method}-{flt}-{data.name}-{length}-f{fold}s{seed}"
    d.mkdir(parents=True)
    cfg = {"method_name": method, "seed": seed, "trainer": {"max_epochs": 1},
           "data": {"source": {"root": str(data)}, "train_filter": flt, "train_episodes_per_epoch": length,
                    "fold": fold, "eval_split": "val"}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    _metrics(d, miou)
    if evals is not None:
        for (split, subset), v in zip([("train", "with_base"), ("train", "without_base"), ("val", "with_base"),
                                       ("val", "without_base")], evals):
            _metrics(d / "bias" / f"{split}-{subset}", v)
        if base is not None:
            _metrics(d / "bias" / "base-val", base)
    return d


def _evals(bias_points: float) -> tuple[float, float, float, float]:
    """Four evaluations whose difference of differences is ``bias_points`` (in %): (0.50 - 0.30) - (0.50 - x)."""
    return (0.30, 0.50, 0.50 - 0.20 + bias_points / 100, 0.50)


@pytest.fixture
def stage1(tmp_path):
    data = tmp_path / "data"
    d0 = _dataset(data / "synth", (190, 1000))
    d40 = _dataset(data / "synth_latent40", (400, 1000))
    out = tmp_path / "runs"
    # (length, dataset): keep mIoU, drop mIoU, keep's bias (points)
    table = {(2000, d0): (0.40, 0.42, 4.0),   # gap +2.0: too small
             (2000, d40): (0.38, 0.44, 1.0),  # gap +6.0, bias +1.0: not clearly non-zero
             (7000, d0): (0.45, 0.505, 3.5),  # gap +5.5, bias +3.5: meets, cheapest
             (7000, d40): (0.41, 0.49, 5.0)}  # meets too, but the higher share
    for (length, ds), (keep, drop, b) in table.items():
        _run(out, ds, flt="keep", length=length, miou=keep, evals=_evals(b))
        _run(out, ds, flt="drop", length=length, miou=drop, evals=_evals(0.0))
    return out


def test_pick_takes_the_cheapest_point_that_meets_the_rule(stage1):
    # by default fsseg-bias's measure is reported, not required: the cheapest point with the gap is (2k, share 0.4)
    default = pick(read_runs([stage1]))
    assert (default["choice"]["length"], default["choice"]["dial"]) == (2000, "synth_latent40")
    assert default["rule"]["min_bias"] is None and default["choice"]["bias"] == pytest.approx(1.0)
    res = pick(read_runs([stage1]), min_bias=3.0)  # the literal rule: keep - drop >= 3 as well
    ch = res["choice"]
    assert (ch["length"], Path(ch["dial"]).name) == (7000, "synth")
    assert ch["gap"] == pytest.approx(5.5) and ch["bias_keep"] == pytest.approx(3.5) and ch["bias"] == pytest.approx(3.5)
    assert ch["share"] == pytest.approx(0.19)
    cands = {(c["length"], c["dial"]): c for c in res["candidates"]}
    assert not cands[2000, "synth"]["meets"] and "drop - keep +2.0 < 5" in cands[2000, "synth"]["why"]
    assert not cands[2000, "synth_latent40"]["meets"] and "keep - drop +1.0 < 3" in cands[2000, "synth_latent40"]["why"]
    assert cands[7000, "synth_latent40"]["meets"]
    assert [(c["length"], c["dial"]) for c in res["candidates"]] == [
        (2000, "synth"), (2000, "synth_latent40"), (7000, "synth"), (7000, "synth_latent40")]
    assert point_overrides(ch) == ["data.train_episodes_per_epoch=7000", "trainer.max_epochs=1",
                                   "data.source.root=${paths.data_dir}/synth"]
    # a stricter rule moves the pick to the other dial; a stricter still finds none
    assert pick(read_runs([stage1]), min_gap=6.0, min_bias=3.0)["choice"]["dial"] == "synth_latent40"
    assert pick(read_runs([stage1]), min_gap=9.0, min_bias=3.0)["choice"] is None


def test_pick_needs_fsseg_bias_on_the_keep_runs_when_the_rule_asks_for_it(tmp_path):
    ds = _dataset(tmp_path / "synth", (190, 1000))
    _run(tmp_path / "runs", ds, flt="keep", miou=0.30)  # no bias evaluations yet (nor the base-class control)
    _run(tmp_path / "runs", ds, flt="drop", miou=0.45, evals=_evals(0.0))
    res = pick(read_runs([tmp_path / "runs"]), min_bias=3.0)
    assert res["choice"] is None and "fsseg-bias not run" in res["candidates"][0]["why"]
    assert pick(read_runs([tmp_path / "runs"]))["candidates"][0]["why"] == "base-class control not run on every run"


def test_pick_asks_for_a_gap_specific_to_novel_classes(tmp_path):
    """The base-class control: a keep/drop gap that the base classes show as well is a general deficit of keep,
    not novel objects learnt as background; only the novel-specific part (novel gap - base gap) counts."""
    ds = _dataset(tmp_path / "synth_latent40", (400, 1000))
    runs = tmp_path / "runs"
    # novel gap 0.47 - 0.35 = 12 points; base gap 0.41 - 0.32 = 9 points: specific 3 < 5
    _run(runs, ds, flt="keep", miou=0.35, evals=_evals(4.0), base=0.32)
    _run(runs, ds, flt="drop", miou=0.47, evals=_evals(0.0), base=0.41)
    res = pick(read_runs([runs]))
    c = res["candidates"][0]
    assert res["choice"] is None and c["gap"] == pytest.approx(12.0) and c["gap_base"] == pytest.approx(9.0)
    assert c["specific"] == pytest.approx(3.0) and c["why"] == "novel-specific +3.0 (base classes +9.0) < 5"
    assert pick(read_runs([runs]), min_specific=3.0)["choice"] is not None
    assert "gap +12.0 (base +9.0)" in bias_study._report(res)
    # without the control on disk the point cannot qualify
    (runs / "pfenet-keep-synth_latent40-2000-f0s0" / "bias" / "base-val" / "metrics.json").unlink()
    assert pick(read_runs([runs]))["candidates"][0]["why"] == "base-class control not run on every run"
    # a point stage 2 rejected is passed over
    _run(runs, ds, flt="keep", miou=0.35, seed=1, evals=_evals(4.0), base=0.40)
    _run(runs, ds, flt="drop", miou=0.47, seed=1, evals=_evals(0.0), base=0.40)
    (runs / "pfenet-keep-synth_latent40-2000-f0s0").rename(tmp_path / "gone")
    assert pick(read_runs([runs]))["choice"]["specific"] == pytest.approx(12.0)
    res = pick(read_runs([runs]), rejected=[(2000, "synth_latent40")])
    assert res["choice"] is None and res["candidates"][0]["why"] == "rejected by stage 2 (pick.json)"


def test_pick_measures_the_bias_against_drop_as_its_null(tmp_path):
    """fsseg-bias's difference of differences has an offset of its own (the train and eval splits differ: both keep
    and drop measure -7.3 at 7k episodes on the default share); the rule takes keep - drop, paired."""
    ds = _dataset(tmp_path / "synth", (190, 1000))
    runs = tmp_path / "runs"
    _run(runs, ds, flt="keep", miou=0.40, evals=_evals(5.0))
    _run(runs, ds, flt="drop", miou=0.47, evals=_evals(4.0))  # keep alone would pass (5 >= 3); keep - drop = 1
    c = pick(read_runs([runs]), min_bias=3.0)["candidates"][0]
    assert (c["bias_keep"], c["bias_drop"]) == (pytest.approx(5.0), pytest.approx(4.0))
    assert c["bias"] == pytest.approx(1.0) and c["why"] == "fsseg-bias keep - drop +1.0 < 3"
    assert pick(read_runs([runs]), min_bias=1.0)["choice"] is not None
    assert pick(read_runs([runs]))["choice"] is not None  # not required by default
    assert bias_study.main(["pick", str(runs), "--min-bias", "3", "--overrides"]) == 1
    assert bias_study.main(["pick", str(runs), "--min-bias", "0.5", "--overrides"]) == 0


def test_pick_cli_prints_the_overrides(stage1, capsys):
    assert bias_study.main(["pick", str(stage1), "--overrides"]) == 0
    assert capsys.readouterr().out.split() == point_overrides(pick(read_runs([stage1]))["choice"])
    assert bias_study.main(["pick", str(stage1), "--overrides", "--min-gap", "50"]) == 1
    assert bias_study.main(["pick", str(stage1 / "nope")]) == 2


def test_figure_plots_means_from_the_run_directories(tmp_path):
    ds = _dataset(tmp_path / "synth_latent40", (400, 1000))
    runs = tmp_path / "runs"
    _run(runs, ds, flt="keep", length=2000, seed=0, miou=0.30, evals=_evals(2.0))
    _run(runs, ds, flt="keep", length=2000, seed=1, miou=0.40, evals=_evals(4.0))
    _run(runs, ds, flt="drop", length=2000, seed=0, miou=0.50)
    _run(runs, ds, flt="keep", length=7000, seed=0, miou=0.20, evals=_evals(6.0))
    _run(runs, ds, method="apanet", flt="keep", length=2000, seed=0, miou=0.35, evals=_evals(-1.0))
    (runs / "junk").mkdir()  # a folder without a run is ignored
    assert bias_study.main(["figure", str(runs), "--to", str(tmp_path / "fig")]) == 0
    png, table = tmp_path / "fig" / "bias_curves.png", tmp_path / "fig" / "bias_curves.csv"
    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 200
    rows = {(r["series"], int(r["length"])): r for r in csv.DictReader(table.open())}
    assert set(rows) == {("pfenet keep", 2000), ("pfenet keep", 7000), ("pfenet drop", 2000), ("apanet keep", 2000)}
    k2 = rows["pfenet keep", 2000]
    assert float(k2["miou"]) == pytest.approx(35.0) and float(k2["bias"]) == pytest.approx(3.0)
    assert int(k2["runs"]) == 2 and float(k2["share"]) == pytest.approx(0.4) and k2["dial"] == "synth_latent40"
    assert float(rows["pfenet keep", 7000]["bias"]) == pytest.approx(6.0)
    assert rows["pfenet drop", 2000]["bias"] == "nan" and int(rows["pfenet drop", 2000]["bias_runs"]) == 0
    assert float(rows["apanet keep", 2000]["bias"]) == pytest.approx(-1.0)
    # PFENet's drop - keep per (length, dial), paired on (fold, seed): only seed 0 has both (0.50 - 0.30); drop has
    # no base-class control on disk, so no novel-specific part
    gaps = list(csv.DictReader((tmp_path / "fig" / "bias_gaps.csv").open()))
    assert [(int(g["length"]), g["dial"], int(g["points"])) for g in gaps] == [(2000, "synth_latent40", 1)]
    assert float(gaps[0]["gap"]) == pytest.approx(20.0) and gaps[0]["specific"] == ""
    assert bias_study.main(["figure", str(tmp_path / "empty_dir_missing")]) == 2


def test_make_targets_run_the_study_and_the_figure():
    env = {**os.environ, "MAKEFLAGS": ""}
    out = subprocess.run(["make", "-n", "-o", ".venv/.fsseg-installed", "bias-study", "bias-figure", "synth-dial"],
                         cwd=REPO, capture_output=True, text=True, env=env, check=False)  # fmt: skip
    assert "-m fsseg.cli.bias_study run" in out.stdout, out.stdout + out.stderr
    assert "-m fsseg.cli.bias_study figure" in out.stdout
    assert "--latent-share 0.4" in out.stdout and "--latent-share 0.6" in out.stdout


def test_run_stages_confirm_the_pick_on_stage_2_or_go_on(tmp_path, monkeypatch, capsys):
    """The driver's staging with the trainers replaced by fakes that write run directories: stage 1 runs the columns
    cheapest first; the first pick (7k, share 0.4) fails stage 2's base-class control and is rejected; the 7k
    column has no other qualifying point, so the 20k column runs and its cheapest point (default share) is confirmed;
    stage 3 runs there, under the point's folder; fsseg-bias always adds the base-class control; fsseg-lps runs once
    per fold; pick.json records the rejection and the confirmation; a re-run resumes without a second stage 2."""
    import fsseg.cli.bias
    import fsseg.cli.lps
    import fsseg.cli.sweep

    data = tmp_path / "data"
    dsets = {"synth": _dataset(data / "synth", (190, 1000)), "synth_latent40": _dataset(data / "synth_latent40", (400, 1000)),
             "synth_latent60": _dataset(data / "synth_latent60", (600, 1000))}  # fmt: skip
    out = tmp_path / "sweeps"
    calls: list[list[str]] = []
    # stage 1, (length) -> keep, drop, keep's bias: only (7000, synth_latent40) and (20000, *) meet the rule
    values = {2000: (0.40, 0.42, 1.0), 7000: (0.40, 0.43, 4.0), 20000: (0.40, 0.47, 4.0)}
    # stage 2 base-class mIoU (keep, drop) per point: at 7k/latent40 the base classes lose 6 of the 7 points
    stage2_base = {(7000, "synth_latent40"): (0.35, 0.41), (20000, "synth"): (0.40, 0.40)}

    def fake_sweep(argv):
        calls.append(list(argv))
        if argv[0] == "bias-stage1" and not (out / "bias-stage1" / argv[2]).exists():  # resumable: done is done
            length = {"len2k": 2000, "len7k": 7000, "len20k": 20000, "len50k": 50000}[argv[2]]
            for name, ds in dsets.items():
                keep, drop, b = values[length]
                if name == "synth_latent40" and length == 7000:
                    drop = 0.47
                _run(out / "bias-stage1" / argv[2], ds, flt="keep", length=length, miou=keep, evals=_evals(b))
                _run(out / "bias-stage1" / argv[2], ds, flt="drop", length=length, miou=drop, evals=_evals(0.0))
        if argv[0] == "bias-stage2":
            length, dial = int(argv[1].split("=")[1]), argv[3].rsplit("/", 1)[1]
            root = Path(argv[argv.index("--out") + 1]) / "bias-stage2" / "paper"
            if not root.exists():
                bk, bd = stage2_base[length, dial]
                for fold in range(4):
                    _run(root, dsets[dial], flt="keep", length=length, fold=fold, miou=0.40, evals=_evals(4.0), base=bk)
                    _run(root, dsets[dial], flt="drop", length=length, fold=fold, miou=0.47, evals=_evals(0.0), base=bd)
        return 0

    monkeypatch.setattr(fsseg.cli.sweep, "main", fake_sweep)
    monkeypatch.setattr(fsseg.cli.bias, "main", lambda argv: calls.append(["fsseg-bias", *argv]) or 0)
    monkeypatch.setattr(fsseg.cli.lps, "main", lambda argv: calls.append(["fsseg-lps", *argv]))
    monkeypatch.setattr(bias_study, "ensure_datasets", lambda d: None)
    assert bias_study.run_study(str(out), 1, 300, 3, data) == 0
    sweeps = [c for c in calls if c[0] not in ("fsseg-bias", "fsseg-lps")]
    first = ["data.train_episodes_per_epoch=7000", "trainer.max_epochs=1", "data.source.root=${paths.data_dir}/synth_latent40"]
    point = ["data.train_episodes_per_epoch=20000", "trainer.max_epochs=1", "data.source.root=${paths.data_dir}/synth"]
    assert [c[:3] for c in sweeps[:2]] == [["bias-stage1", "--profile", "len2k"], ["bias-stage1", "--profile", "len7k"]]
    assert sweeps[2][:6] == ["bias-stage2", *first, "--out", str(out / "bias-points" / "7000-synth_latent40")]
    assert sweeps[3][:3] == ["bias-stage1", "--profile", "len20k"]
    point_dir = str(out / "bias-points" / "20000-synth")
    assert sweeps[4][:6] == ["bias-stage2", *point, "--out", point_dir]
    later = [c for c in sweeps if c[0] != "bias-stage1"]
    assert len(later) == 6 and all(c[c.index("--reuse-from") + 1] == str(out) for c in later)  # stage 1's runs re-used
    stage3 = ("apanet-table4", "celp-table1", "bam-compare", "bias-celp-drop")
    assert [c[:3] for c in sweeps[5:]] == [[n, "--profile", "bias"] for n in stage3]
    assert all(c[3:8] == [*point, "--out", point_dir] for c in sweeps[5:])
    assert len(sweeps) == 9  # no 50k column once a point is confirmed
    biases = [c for c in calls if c[0] == "fsseg-bias"]
    assert len(biases) == 3 + 2 + 4 and all("--base-control" in c for c in biases)
    lps = [c for c in calls if c[0] == "fsseg-lps"]
    assert [c[1:3] for c in lps] == [[f"data.fold={f}", point[2]] for f in range(4)]
    pick_json = json.loads((out / "bias-stage1" / "pick.json").read_text())
    assert (pick_json["choice"]["length"], pick_json["choice"]["dial"]) == (20000, "synth")
    assert pick_json["confirmed"]["points"] == 4 and pick_json["confirmed"]["specific"] == pytest.approx(7.0)
    [rej] = pick_json["rejected"]
    assert (rej["length"], rej["dial"]) == (7000, "synth_latent40")
    assert rej["stage2"]["gap_base"] == pytest.approx(6.0) and "novel-specific +1.0" in rej["why"]
    assert (out / "bias-stage1" / "bias_curves.png").is_file() and (out / "bias-study" / "bias_curves.csv").is_file()
    # the pick CLI honours the rejection recorded in pick.json
    capsys.readouterr()
    assert bias_study.main(["pick", "--out", str(out), "--overrides"]) == 0
    assert capsys.readouterr().out.split() == point
    # resumed, stage 1 only: the recorded rejection holds, nothing is confirmed again
    calls.clear()
    assert bias_study.run_study(str(out), 1, 300, 1, data) == 0
    assert {c[0] for c in calls if c[0] not in ("fsseg-bias", "fsseg-lps")} == {"bias-stage1"}
    pick_json = json.loads((out / "bias-stage1" / "pick.json").read_text())
    assert pick_json["choice"]["length"] == 20000 and pick_json["confirmed"]["points"] == 4


def _collapse(run_dir: Path, fp_rate: float) -> None:
    rec = json.loads((run_dir / "metrics.json").read_text())
    rec["metrics"]["fp_rate"] = fp_rate
    (run_dir / "metrics.json").write_text(json.dumps(rec))


def test_pick_leaves_out_pairs_that_collapsed_to_all_background(tmp_path):
    """A run with mIoU 0 and no false positive predicted no foreground at all (the all-background start); a pair
    holding one is left out of the means, and a point left with no pair does not qualify."""
    ds = _dataset(tmp_path / "synth_latent60", (600, 1000))
    runs = tmp_path / "runs"
    # seed 0: both stuck at all-background; seed 1: gap 6.0, bias 4.0 -> the point meets on seed 1 alone
    k0 = _run(runs, ds, flt="keep", seed=0, miou=0.0, evals=_evals(0.0))
    d0 = _run(runs, ds, flt="drop", seed=0, miou=0.0, evals=_evals(0.0))
    _collapse(k0, 0.0), _collapse(d0, 0.0)
    _collapse(_run(runs, ds, flt="keep", seed=1, miou=0.30, evals=_evals(4.0)), 0.02)
    _collapse(_run(runs, ds, flt="drop", seed=1, miou=0.36, evals=_evals(0.0)), 0.03)
    res = pick(read_runs([runs]))
    c = res["candidates"][0]
    assert (c["points"], c["collapsed"]) == (1, 1) and c["meets"]
    assert c["gap"] == pytest.approx(6.0) and c["bias_keep"] == pytest.approx(4.0)
    assert "1 collapsed pair(s) left out" in bias_study._report(res)
    # keep alone collapsed on seed 1 as well (mIoU 0, fp 0): no pair left, the point does not qualify;
    # mIoU 0 with false positives is a bad run, not a collapsed one, and stays in
    (runs / "pfenet-keep-synth_latent60-2000-f0s1" / "metrics.json").write_text(
        json.dumps({"metrics": {"miou": 0.0, "fp_rate": 0.0}, "episodes": 300}))
    res = pick(read_runs([runs]))
    assert res["choice"] is None and res["candidates"][0]["why"] == "all 2 (fold, seed) pairs collapsed to all-background"
    _collapse(k0, 0.01), _collapse(d0, 0.01)
    c = pick(read_runs([runs]))["candidates"][0]
    assert (c["points"], c["collapsed"]) == (1, 1) and c["gap"] == pytest.approx(0.0)


def test_stage3_pfenet_rows_are_stage2_runs_reused():
    """Stage 3's PFENet rows (APANet's baseline, CELP's and BAM's PFENet rows, CELP's drop control) compose, at the
    picked point, to the same computation as stage 2's keep / drop runs, so fsseg-sweep --reuse-from copies them
    instead of re-training; the method rows (APANet n = 3, CELP, CELP drop, BAM) are runs of their own."""
    from fsseg_testing import CONF

    from fsseg.sweeps import compose_run_configs, find_sweep, load_sweep, merge_overrides, run_identity

    choice = {"length": 7000, "per_epoch": 7000, "epochs": 1, "dial": "synth_latent60"}
    over = point_overrides(choice)
    point = {"data.fold": 2, "seed": 1}

    def identities(name: str, profile: str) -> dict[str, str]:
        runs = [r for r in load_sweep(find_sweep(name, REPO / "sweeps")).expand(profile, "out") if dict(r.point) == point]
        items = [(merge_overrides(r.overrides, over, ["resume=auto"]), f"out/{r.row.label}") for r in runs]
        configs = compose_run_configs(items, CONF)
        assert not any(isinstance(c, Exception) for c in configs), configs
        return {r.row.label: run_identity(c) for r, c in zip(runs, configs)}

    stage2 = identities("bias-stage2", "paper")
    apanet, celp, bam = (identities(n, "bias") for n in ("apanet-table4", "celp-table1", "bam-compare"))
    assert apanet["n = 0 (baseline)"] == stage2["keep"] != apanet["n = 3"]
    assert celp["PFENet ResNet-50 1-shot"] == stage2["keep"] != celp["Ours+PFENet ResNet-50 1-shot"]
    assert bam["PFENet"] == stage2["keep"] and bam["PFENet drop"] == stage2["drop"] != stage2["keep"]
    assert bam["BAM"] not in stage2.values()
    control = identities("bias-celp-drop", "bias")  # CELP's control under drop: its PFENet row is stage 2's drop
    assert control["PFENet drop"] == stage2["drop"] and control["CELP drop"] not in (*stage2.values(), *celp.values())


def test_stage3_runs_under_a_profile_called_bias_are_read_and_their_effects_tabled(tmp_path):
    """Stage 3's sweeps write <sweep>/bias/<row>/<point>/ (profile `bias`) and fsseg-bias writes <run>/bias/<eval>/:
    the runs are read, their evaluation folders are not. `method_effects` on hand-chosen numbers: 3 (fold, seed)
    points with PFENet keep / drop and APANet, a fourth APANet run without its pair left out."""
    from fsseg.cli.bias_study import method_effects, write_method_effects

    ds = _dataset(tmp_path / "data" / "synth_latent40", (400, 1000))
    stage2, stage3 = tmp_path / "bias-stage2" / "paper", tmp_path / "apanet-table4" / "bias" / "n-3"
    novel = {"keep": (0.40, 0.44, 0.42), "drop": (0.52, 0.54, 0.50), "apanet": (0.46, 0.47, 0.50)}
    base = {"keep": (0.60, 0.62, 0.61), "drop": (0.61, 0.62, 0.60), "apanet": (0.63, 0.64, 0.62)}
    bias = {"keep": (1.0, 1.0, 1.0), "drop": (0.0, 0.0, 0.0), "apanet": (2.0, 4.0, 6.0)}
    for fold in range(3):
        for name in ("keep", "drop", "apanet"):
            method, flt = ("apanet", "keep") if name == "apanet" else ("pfenet", name)
            _run(stage3 if name == "apanet" else stage2, ds, method=method, flt=flt, length=7000, fold=fold,
                 miou=novel[name][fold], evals=_evals(bias[name][fold]), base=base[name][fold])  # fmt: skip
    _run(stage3, ds, method="apanet", length=7000, fold=0, seed=1, miou=0.9, evals=_evals(0.0))  # no keep/drop pair
    points = read_runs([tmp_path])
    assert sorted((p.series, p.fold, p.seed) for p in points if p.method == "apanet") == [
        ("apanet keep", 0, 0), ("apanet keep", 0, 1), ("apanet keep", 1, 0), ("apanet keep", 2, 0)]  # fmt: skip
    assert len(points) == 10  # 9 + the unpaired one; no evaluation folder read as a run

    rows = {r["series"]: r for r in method_effects(points)}
    assert list(rows) == ["pfenet keep", "pfenet drop", "apanet keep"]
    a = rows["apanet keep"]
    t2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5 %
    # APANet - keep: 6, 3, 8 points; APANet - drop: -6, -7, 0; drop - keep: 12, 10, 8
    assert a["points"] == 3 and a["miou"][0] == pytest.approx((46 + 47 + 50) / 3)
    assert a["d_keep"][0] == pytest.approx(17 / 3) and a["d_keep"][1] == pytest.approx(t2 * (19 / 3) ** 0.5 / 3**0.5)
    assert a["wins_keep"] == 3 and a["d_drop"][0] == pytest.approx(-13 / 3) and a["wins_drop"] == 0
    assert a["closed"] == pytest.approx(100 * (17 / 3) / 10)
    # base classes: APANet - keep 3, 2, 1 points; novel-specific 3, 1, 7
    assert a["base"] == pytest.approx(63.0) and a["d_base_keep"][0] == pytest.approx(2.0)
    assert a["specific_keep"][0] == pytest.approx(11 / 3) and a["bias"] == pytest.approx(4.0)
    assert rows["pfenet drop"]["closed"] == pytest.approx(100.0) and rows["pfenet keep"]["d_keep"][0] == 0.0
    md, csv_path = write_method_effects(list(rows.values()), tmp_path / "fig")
    text = md.read_text()
    assert "| apanet keep | 3 | 47.7 ± " in text and "| +5.7 ± 6.3 (3/3) | -4.3 ± " in text and "| 57 % |" in text
    flat = {r["series"]: r for r in csv.DictReader(csv_path.open())}
    assert float(flat["apanet keep"]["specific_keep"]) == pytest.approx(11 / 3)
