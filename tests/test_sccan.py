"""SCCAN, SCCAN-Plus and Aff: windows, patch alignment and SCCA attention against loops and hand computations,
the prior, the reference's parameter count, bad configs, and every composition end to end on the embedded size."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fsseg_testing import compose

from fsseg.cli.common import instantiate
from fsseg.errors import ConfigError
from fsseg.models.bam import BaseLearner
from fsseg.models.sccan import (
    MaskAggregationHead,
    SCCABlock,
    SCCANDecoder,
    SCCAttention,
    align_windows,
    shift_pad,
    window_merge,
    window_partition,
)
from fsseg.models.segmenter import count_parameters


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- windows -------------------------------------------------------------------------------------------
def test_window_partition_holds_the_raster_windows_and_merge_inverts_it():
    x = _rand(2, 12, 8, 3)
    win = window_partition(x, 4)
    assert win.shape == (2, 6, 16, 3)
    for b, r, c in itertools.product(range(2), range(3), range(2)):  # window r * 2 + c = rows 4r.., cols 4c..
        assert torch.equal(win[b, r * 2 + c], x[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(16, 3))
    assert torch.equal(window_merge(win, 4, 12, 8), x)


def test_shift_pads_zeros_half_a_window_before_and_the_rest_after():
    x = _rand(1, 8, 8, 2) + 1
    p = shift_pad(x, 4)
    assert p.shape == (1, 12, 12, 2)
    assert torch.equal(p[:, 2:10, 2:10], x)
    inside = torch.zeros(12, 12, dtype=torch.bool)
    inside[2:10, 2:10] = True
    assert (p[:, ~inside] == 0).all()
    p5 = shift_pad(x, 5)  # odd window: 2 before, 3 after
    assert p5.shape == (1, 13, 13, 2) and torch.equal(p5[:, 2:10, 2:10], x)
    assert torch.equal(window_merge(window_partition(p, 4), 4, 12, 12)[:, 2:10, 2:10], x)  # round trip


# ---- patch alignment -----------------------------------------------------------------------------------
def _align_by_loop(q, s, m, w):
    b, h, wd, _ = q.shape
    n_r, n_c = h // w, wd // w
    out = torch.zeros(b, n_r * n_c, dtype=torch.long)
    for bi in range(b):
        protos = []
        for r, c in itertools.product(range(n_r), range(n_c)):
            sw, mw = s[bi, r * w : (r + 1) * w, c * w : (c + 1) * w], m[bi, r * w : (r + 1) * w, c * w : (c + 1) * w]
            area = mw.sum().item()
            protos.append(((sw * mw).sum((0, 1)) / (area + 5e-4), area > 0))
        for i, (r, c) in enumerate(itertools.product(range(n_r), range(n_c))):
            qp = q[bi, r * w : (r + 1) * w, c * w : (c + 1) * w].mean((0, 1))
            best, best_j = -1.0, 0
            for j, (sp, has_fg) in enumerate(protos):
                cos = (qp @ sp).item() / (qp.norm().item() * sp.norm().item() + 1e-7)
                score = (cos + 1) / 2 if has_fg else 0.0
                if score > best:  # strict: the first of equal scores wins
                    best, best_j = score, j
            out[bi, i] = best_j
    return out


@pytest.mark.parametrize("shifted", [False, True])
def test_patch_alignment_picks_the_window_a_loop_picks(shifted):
    q, s = _rand(3, 8, 8, 5, seed=1) - 0.5, _rand(3, 8, 8, 5, seed=2) - 0.5
    m = (_rand(3, 8, 8, 1, seed=3) > 0.7).double() * _rand(3, 8, 8, 1, seed=4)  # soft, sparse foreground
    m[2] = 0  # no foreground at all: every score 0, the first window
    if shifted:
        q, s, m = shift_pad(q, 4), shift_pad(s, 4), shift_pad(m, 4)
    got = align_windows(q, s, m, 4)
    assert torch.equal(got, _align_by_loop(q, s, m, 4))
    assert (got[2] == 0).all()


# ---- SCCA attention ------------------------------------------------------------------------------------
def test_scca_attention_is_one_softmax_over_scaled_self_and_cosine_cross_scores():
    torch.manual_seed(0)
    attn = SCCAttention(8, 2).double().eval()
    x, ctx = _rand(1, 4, 8, seed=5) - 0.5, _rand(1, 3, 8, seed=6) - 0.5
    with torch.no_grad():
        weights, _ = attn.weights(x, ctx)
        qp, kvp = attn.q(x)[0], attn.kv(torch.cat([x, ctx], 1))[0]
    k_all = kvp[:, :8]
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        for i in range(4):
            qi = qp[i, sl]
            scores = [float(qi @ k_all[j, sl]) / math.sqrt(4) for j in range(4)]
            scores += [float(qi @ k_all[j, sl]) / (float(qi.norm()) * float(k_all[j, sl].norm()) + 1e-7) for j in range(4, 7)]
            e = np.exp(np.array(scores) - max(scores))
            np.testing.assert_allclose(weights[0, h, i].detach().numpy(), e / e.sum(), rtol=1e-10)
    self_only, _ = attn.weights(x)
    assert self_only.shape == (1, 2, 4, 4)  # the support branch: scaled dot products over its own window only


@pytest.mark.parametrize("shifted", [False, True])
def test_scca_block_equals_a_loop_over_windows(shifted):
    torch.manual_seed(1)
    block = SCCABlock(8, 2, 4, shifted).double().eval()
    q, s = _rand(2, 8, 8, 8, seed=7) - 0.5, _rand(2, 8, 8, 8, seed=8) - 0.5
    m = (_rand(2, 8, 8, 1, seed=9) > 0.6).double()
    out_q, out_s, _ = block.attend(q, s, m)
    qp, sp, mp = (shift_pad(q, 4), shift_pad(s, 4), shift_pad(m, 4)) if shifted else (q, s, m)
    idx = _align_by_loop(qp, sp, mp, 4)
    hp = qp.shape[1]
    exp_q, exp_s = torch.zeros_like(qp), torch.zeros_like(sp)
    n_c = hp // 4
    for b, i in itertools.product(range(2), range(n_c * n_c)):
        r, c = divmod(i, n_c)
        jr, jc = divmod(int(idx[b, i]), n_c)
        qw = qp[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(1, 16, 8)
        sw = sp[b, 4 * jr : 4 * jr + 4, 4 * jc : 4 * jc + 4].reshape(1, 16, 8)
        own = sp[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(1, 16, 8)
        exp_q[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = block.attn_q(qw, sw).view(4, 4, 8)
        exp_s[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = block.attn_s(own).view(4, 4, 8)
    if shifted:
        exp_q, exp_s = exp_q[:, 2:10, 2:10], exp_s[:, 2:10, 2:10]
    torch.testing.assert_close(out_q, exp_q)
    torch.testing.assert_close(out_s, exp_s)


def test_no_attention_row_is_degenerate_without_foreground_or_with_zero_features():
    torch.manual_seed(2)
    dec = SCCANDecoder(16, grid_size=8, num_heads=4, window_size=4, num_blocks=2, dilations=(1,)).eval()
    guidance = {
        "query_feat": torch.zeros(2, 16, 8, 8), "support_fused": torch.zeros(2, 16, 8, 8),
        "support_mask_fused": torch.zeros(2, 1, 8, 8), "prototype": torch.zeros(2, 16, 1, 1), "prior": torch.zeros(2, 1, 8, 8),
    }  # fmt: skip
    assert torch.isfinite(dec(guidance)["logits"]).all()
    block = dec.transformer["blocks"][1]
    w, _ = block.attn_q.weights(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))  # zero keys: cosines 0/eps = 0
    assert torch.isfinite(w).all() and torch.allclose(w.sum(-1), torch.ones(()).expand_as(w.sum(-1)))
    for attention in ("scca", "global"):
        d = SCCANDecoder(16, grid_size=8, num_heads=4, window_size=4, num_blocks=2, dilations=(1,), attention=attention)
        g = {k: torch.randn_like(v) for k, v in guidance.items()} | {"support_mask_fused": torch.zeros(2, 1, 8, 8)}
        assert torch.isfinite(d(g)["logits"]).all()


# ---- the prior -----------------------------------------------------------------------------------------
def test_pseudo_mask_aggregation_prior_by_hand():
    torch.manual_seed(3)
    head = MaskAggregationHead({"mid": 4, "high": 3}, reduce_dim=4, grid_size=4).double()
    qh, sh = _rand(1, 3, 3, 3, seed=10), _rand(1, 2, 3, 4, 4, seed=11)  # query layer4 at its own 3x3; grid 4
    m = (_rand(1, 2, 1, 4, 4, seed=12) > 0.5).double()
    prior = head.prior({"high": qh}, {"high": sh}, m)
    expect = np.zeros((3, 3))
    for k in range(2):
        q, s, mk = qh[0].numpy().reshape(3, -1).T, sh[0, k].numpy().reshape(3, -1).T, m[0, k, 0].numpy().ravel()
        cos = (q @ s.T) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(s, axis=1)[None] + 1e-7)
        wts = np.exp(cos) / np.exp(cos).sum(1, keepdims=True)
        agg = wts @ mk
        expect += ((agg - agg.min()) / (agg.max() - agg.min() + 1e-7)).reshape(3, 3) / 2
    resized = torch.nn.functional.interpolate(torch.from_numpy(expect)[None, None], size=(4, 4), mode="bilinear", align_corners=True)
    torch.testing.assert_close(prior, resized, rtol=1e-5, atol=1e-5)  # the prior is computed in fp32


# ---- parameter counts and bad configs ------------------------------------------------------------------
def test_sccan_parameter_count_matches_the_reference():
    # notes: SCCAN 11.37 M trainable (ResNet-50 channels; frozen backbone excluded), transformer 6.32 M
    head, dec = MaskAggregationHead({"mid": 1536, "high": 2048}), SCCANDecoder(256)
    n = count_parameters(head) + count_parameters(dec)
    assert n == pytest.approx(11.37e6, rel=0.01)
    assert n == 11_373_314  # round2-references.md §3.3 recount
    assert count_parameters(dec.transformer) == pytest.approx(6.32e6, rel=0.01)


def test_bad_window_or_heads_are_refused_naming_the_option():
    with pytest.raises(ConfigError, match="decoder.window_size"):
        SCCANDecoder(16, grid_size=10, window_size=4)
    with pytest.raises(ConfigError, match="decoder.num_heads"):
        SCCANDecoder(16, grid_size=8, num_heads=3, window_size=4)
    with pytest.raises(ConfigError, match="decoder.num_heads"):
        SCCANDecoder(16, grid_size=8, num_heads=3, attention="global")
    SCCANDecoder(16, grid_size=10, window_size=4, attention="global")  # Aff has no windows


# ---- compositions end to end (embedded size, tiny budget) ----------------------------------------------
def _stage1_file(tmp_path: Path, encoder_cfg) -> Path:
    from fsseg.models.base_learner import write_artifact

    enc = instantiate(encoder_cfg)
    learner = BaseLearner(enc.tap_channels["base"], 15, list(range(6, 21)))  # fold 0 of the embedded benchmark
    meta = {"fold": 0, "encoder": enc.name, "tap": "base", "in_dim": learner.in_dim,
            "base_class_ids": list(range(6, 21)), "bins": [1, 2, 3, 6]}  # fmt: skip
    path = tmp_path / "fold0.pt"
    write_artifact(path, {f"head.{k}": v for k, v in learner.state_dict().items()}, meta)
    return path


def run_tiny(experiment: str, synth_root: Path, tmp_path: Path, *extra: str) -> dict:
    """One training step, one validation and one test batch of an experiment alias at 64 px."""
    from fsseg.cli.train import run

    over = [
        f"experiment={experiment}", f"data.source.root={synth_root}", f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.output_dir={tmp_path / 'outputs'}", "encoder.weights=none", "data.train_size=64", "data.eval_size=64",
        "data.batch_size=2", "data.eval_batch_size=2", "data.train_episodes_per_epoch=2", "data.val_episodes=2",
        "data.eval_episodes=2", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "logger=none",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", *extra,
    ]  # fmt: skip
    cfg = compose(over)
    if "base_learner_path" in cfg:
        over.append(f"base_learner_path={_stage1_file(tmp_path, cfg.encoder)}")
        cfg = compose(over)
    return run(cfg, tmp_path / "run")


@pytest.mark.parametrize("experiment", ["sccan_effl0_synth", "aff_effl0_synth", "sccan_plus_effl0_synth"])
def test_composition_trains_one_step_and_evaluates(experiment, synth_root, tmp_path):
    metrics = run_tiny(experiment, synth_root, tmp_path)
    assert 0.0 <= metrics["miou"] <= 1.0 and len(metrics["class_iou"]) == 5
    assert 0.0 <= metrics["fp_rate"] <= 1.0 and 0.0 <= metrics["fn_rate"] <= 1.0
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["state_dict"]
    assert any(k.startswith("decoder.transformer.") for k in state)
    opt = ckpt["optimizer_states"][0]
    assert "optimizers" in opt and len(opt["optimizers"]) == 2  # SGD/AdamW-poly set + the transformer's AdamW


# ---- fsseg-convert: SCCAN's released checkpoints ---------------------------------------------------------
def test_sccan_checkpoint_layout_converts_to_the_same_forward(tmp_path):
    from test_convert import SMALL, _episode, _old_style, _randomise_bn
    from torch import nn

    from fsseg.cli.convert import convert

    over = ["method=sccan", "encoder=resnet50", "recipe=sccan_pascal", *SMALL, "head.grid_size=8",
            "decoder.window_size=4", "decoder.num_blocks=2"]  # fmt: skip
    cfg = compose([*over, "encoder.weights=none"])
    torch.manual_seed(0)
    original = instantiate(cfg.model, num_eval_classes=5).eval()
    _randomise_bn(original)
    with torch.no_grad():  # LayerNorms and biases away from their init too, so a swapped name would show
        for p in original.decoder.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m, dec = original.encoder.model, original.decoder
    ref = nn.Module()  # SCCAN's OneModel attribute names (model/SCCAN.py, swin_sccan.py, backbone_utils.py)
    ref.backbone = nn.Module()
    body = ref.backbone.body = nn.Module()  # IntermediateLayerGetter over backbone_res's deep-stem ResNet
    body.conv1, body.bn1, body.conv2, body.bn2, body.conv3, body.bn3 = m.conv1[0], m.conv1[1], m.conv1[3], m.conv1[4], m.conv1[6], m.bn1
    for i in range(1, 5):
        setattr(body, f"layer{i}", getattr(m, f"layer{i}"))
    ref.down_query, ref.down_supp = copy.deepcopy(original.head.down_query), copy.deepcopy(original.head.down_support)
    c3 = m.layer3[-1].bn2.num_features  # ResNet-18: 256 (layer2 128)
    with torch.no_grad():  # SCCAN concatenates [layer2, layer3]; fsseg's mid tap is [layer3, layer2]
        for conv in (ref.down_query[0], ref.down_supp[0]):
            assert conv.weight.shape[1] == c3 + m.layer2[-1].bn2.num_features
            conv.weight.copy_(torch.cat([conv.weight[:, c3:], conv.weight[:, :c3]], dim=1))
    ref.init_merge_query, ref.init_merge_supp = nn.Sequential(dec.init_merge_query), nn.Sequential(dec.init_merge_support)
    ref.transformer = nn.Module()
    layer = nn.Module()
    ref.transformer.layers = nn.ModuleList([layer])
    blocks = []
    for blk in dec.transformer["blocks"]:
        b = nn.Module()
        b.norm1, b.attn_q, b.attn_s, b.norm2 = blk.norm1, blk.attn_q, blk.attn_s, blk.norm2
        for name in ("mlp_q", "mlp_s"):
            mlp = nn.Module()
            mlp.fc1, mlp.fc2 = getattr(blk, name)[0], getattr(blk, name)[3]
            setattr(b, name, mlp)
        blocks.append(b)
    layer.blocks = nn.ModuleList(blocks)
    ref.transformer.norm0 = dec.transformer["norm"]
    ref.ASPP_meta = nn.Module()
    for i, mod in enumerate([dec.aspp.pool, *dec.aspp.branches]):
        setattr(ref.ASPP_meta, f"layer6_{i}", mod)
    ref.res1_meta, ref.res2_meta, ref.cls_meta = dec.res1, dec.res2, dec.cls
    src = tmp_path / "sccan.pth"
    torch.save({"state_dict": _old_style(ref.state_dict())}, src)
    out = tmp_path / "sccan.ckpt"
    convert("sccan", src, str(out), over)
    torch.manual_seed(1)
    converted = instantiate(cfg.model, num_eval_classes=5).eval()
    converted.load_state_dict(torch.load(out, weights_only=True)["state_dict"], strict=True)
    batch = _episode()
    assert torch.equal(original(batch)["logits"], converted(batch)["logits"])


# ---- SCCAN-Plus's prior ----------------------------------------------------------------------------------
def _fg_bg_by_hand(q: np.ndarray, s: np.ndarray, m: np.ndarray):
    """AENet's generate_prior_proto for one (episode, shot), query and grid of the same size (no resize)."""
    def pool(w):
        return (s * w).reshape(s.shape[0], -1).sum(1) / (w.sum() + 5e-4)

    def cos(p):
        qf = q.reshape(q.shape[0], -1)
        return (p @ qf) / (np.linalg.norm(p) * np.linalg.norm(qf, axis=0) + 1e-7)

    fg, bg = cos(pool(m)), cos(pool(1 - m))
    mm = [(x - x.min()) / (x.max() - x.min() + 1e-7) for x in (fg, bg)]
    corr = np.clip(mm[0] - mm[1], 0, None)
    return mm[0], corr, fg.max(), corr.max()


def test_plus_prior_keeps_per_shot_and_channel_the_layer_with_the_larger_maximum():
    from fsseg.models.sccan import SCCANPlusHead

    torch.manual_seed(4)
    head = SCCANPlusHead({"mid": 4, "high": 3, "base": 3, "low": 2}, BaseLearner(3, 15, bins=(1,), hidden=5),
                         torch.nn.Identity(), grid_size=3).double()  # fmt: skip
    qh, sh = _rand(2, 3, 3, 3, seed=20) - 0.4, _rand(2, 2, 3, 3, 3, seed=21) - 0.4
    q5, s5 = _rand(2, 5, 3, 3, seed=22) - 0.4, _rand(2, 2, 5, 3, 3, seed=23) - 0.4
    m = (_rand(2, 2, 1, 3, 3, seed=24) > 0.5).double()
    m[..., 0, 0] = 1  # every shot has foreground and background
    m[..., 2, 2] = 0
    prior = head.fg_bg_prior({"high": qh}, {"high": sh}, q5, s5, m)
    expect = np.zeros((2, 2, 9))
    chosen = set()
    for b, k in itertools.product(range(2), range(2)):
        l4 = _fg_bg_by_hand(qh[b].numpy(), sh[b, k].numpy(), m[b, k, 0].numpy())
        l5 = _fg_bg_by_hand(q5[b].numpy(), s5[b, k].numpy(), m[b, k, 0].numpy())
        use_fg, use_corr = (l5 if l4[2] < l5[2] else l4), (l5 if l4[3] < l5[3] else l4)
        chosen.add((l4[2] < l5[2], l4[3] < l5[3]))
        expect[b, 0] += use_fg[0] / 2
        expect[b, 1] += use_corr[1] / 2
    np.testing.assert_allclose(prior.view(2, 2, 9).numpy(), expect, rtol=1e-5, atol=1e-5)
    assert len(chosen) > 1  # the draw exercises both layers


# ---- DDP: the reference's last support branch gets no gradient ---------------------------------------------
@pytest.mark.parametrize("final_support_branch", [True, False])
def test_ddp_without_find_unused_is_refused_only_where_a_parameter_gets_no_gradient(final_support_branch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy
    from test_convert import SMALL, _episode

    from fsseg.data import batch as B

    over = ["method=sccan", "encoder=resnet50", "recipe=sccan_pascal", *SMALL, "head.grid_size=8", "decoder.window_size=4",
            "decoder.num_blocks=2", "encoder.weights=none", f"decoder.final_support_branch={final_support_branch}"]  # fmt: skip
    model = instantiate(compose(over).model, num_eval_classes=5).train()
    batch = _episode()
    batch[B.QUERY_MASK] = torch.randint(0, 2, (2, 65, 65))
    model(batch)["logits"].sum().backward()  # the declaration is checked against what autograd reaches
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert {f"decoder.{n}" for n in model.decoder.parameters_without_gradient()} == no_grad
    assert bool(no_grad) == final_support_branch
    model._trainer = SimpleNamespace(strategy=DDPStrategy())
    if final_support_branch:
        with pytest.raises(ConfigError, match=r"final_support_branch=false.*ddp_find_unused_parameters_true"):
            model._check_ddp_gradients()
    else:
        model._check_ddp_gradients()
    model._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    model._check_ddp_gradients()
